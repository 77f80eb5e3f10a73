//! GGUF v3 writer: tests build tiny models with it; the quantizer writes real files with it.

use crate::reader::align_up;
use crate::{Array, GgmlType, GgufError, Result, Value, DEFAULT_ALIGNMENT, MAGIC};
use std::io::Write;

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then serializes them in one pass.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a metadata key (replacing an earlier value of the same key).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
        self
    }

    /// Add a tensor; `dims[0]` is the row length. `data` must hold exactly the tensor's bytes.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        let bad = |reason: String| GgufError::BadTensor {
            name: name.into(),
            reason,
        };
        let n: u64 = dims.iter().product();
        let need = ty
            .bytes_for(n)
            .ok_or_else(|| bad(format!("{n} elements are not whole {ty} blocks")))?;
        if need != data.len() as u64 {
            return Err(bad(format!(
                "{} bytes given, {need} needed for {dims:?} {ty}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::Duplicate {
                what: "tensor",
                name: name.into(),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(self)
    }

    /// Add an F32 tensor from floats.
    pub fn add_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> Result<&mut Self> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let table = self.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.dims.as_slice(),
                t.ty,
                t.data.len() as u64,
            )
        });
        let mut out = self.header(table);
        let alignment = self.alignment();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(align_up(out.len() as u64, alignment) as usize, 0);
        }
        out
    }

    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.to_bytes())
    }

    /// Starts a file whose tensors are `table`'s, their bytes given afterwards one at a time
    /// through [`GgufStream::put`], so a writer of a large model holds one tensor, not the file.
    /// Each tensor's size follows from its shape and type. The metadata is this writer's; it
    /// must hold no tensors of its own.
    pub fn stream_to<W: Write>(&self, table: &[TensorHeader], out: W) -> Result<GgufStream<W>> {
        if let Some(t) = self.tensors.first() {
            return Err(GgufError::BadTensor {
                name: t.name.clone(),
                reason: "tensors added with their bytes cannot be streamed; declare every \
                         tensor in the table"
                    .into(),
            });
        }
        let mut sizes = Vec::with_capacity(table.len());
        for (i, t) in table.iter().enumerate() {
            if table[..i].iter().any(|u| u.name == t.name) {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name: t.name.clone(),
                });
            }
            let n: u64 = t.dims.iter().product();
            let bytes = t.ty.bytes_for(n).ok_or_else(|| GgufError::BadTensor {
                name: t.name.clone(),
                reason: format!("{n} elements are not whole {} blocks", t.ty),
            })?;
            sizes.push((t.name.clone(), bytes));
        }
        let header = self.header(
            table
                .iter()
                .zip(&sizes)
                .map(|(t, (_, bytes))| (t.name.as_str(), t.dims.as_slice(), t.ty, *bytes)),
        );
        Ok(GgufStream {
            out,
            header: Some(header),
            pending: sizes.into_iter(),
            alignment: self.alignment(),
        })
    }

    fn alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => v.as_u64().unwrap_or(DEFAULT_ALIGNMENT),
            None => DEFAULT_ALIGNMENT,
        }
    }

    /// Everything before the first tensor's bytes: metadata, the tensor table (name, shape, type
    /// and size of each, offsets following from the sizes), padding to the alignment.
    fn header<'a>(
        &self,
        table: impl ExactSizeIterator<Item = (&'a str, &'a [u64], GgmlType, u64)>,
    ) -> Vec<u8> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(table.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in table {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&(ty as u32).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + bytes, alignment);
        }
        out.resize(align_up(out.len() as u64, alignment) as usize, 0);
        out
    }
}

/// One row of a streamed file's tensor table; `dims[0]` is the row length.
#[derive(Clone, Debug)]
pub struct TensorHeader {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// A file being written by [`GgufWriter::stream_to`]: takes each tensor's bytes in the table's
/// order.
pub struct GgufStream<W: Write> {
    out: W,
    /// Written with the first tensor (or at the finish of a file without one).
    header: Option<Vec<u8>>,
    pending: std::vec::IntoIter<(String, u64)>,
    alignment: u64,
}

impl<W: Write> GgufStream<W> {
    /// Writes the next tensor of the table, which must be `name` with exactly its size in bytes.
    /// A tensor refused or not written stays next, so the file can never be finished without it.
    pub fn put(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let Some((next, bytes)) = self.pending.as_slice().first() else {
            return Err(invalid(format!("tensor {name:?} is not in the table")));
        };
        let bytes = *bytes;
        if next != name || bytes != data.len() as u64 {
            return Err(invalid(format!(
                "tensor {name:?} of {} bytes given where the table has {next:?} of {bytes}",
                data.len()
            )));
        }
        self.write_header()?;
        self.out.write_all(data)?;
        let mut padding = align_up(bytes, self.alignment) - bytes;
        const ZEROS: [u8; 64] = [0; 64];
        while padding > 0 {
            let n = padding.min(ZEROS.len() as u64);
            self.out.write_all(&ZEROS[..n as usize])?;
            padding -= n;
        }
        self.pending.next();
        Ok(())
    }

    /// The output, once every tensor of the table was put.
    pub fn finish(mut self) -> std::io::Result<W> {
        match self.pending.next() {
            Some((name, _)) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tensor {name:?} was never written"),
            )),
            None => {
                self.write_header()?;
                Ok(self.out)
            }
        }
    }

    fn write_header(&mut self) -> std::io::Result<()> {
        match self.header.take() {
            Some(h) => self.out.write_all(&h),
            None => Ok(()),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        scalar => scalar.put_scalar(out),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    for i in 0..a.len() {
        if let Some(s) = a.str_at(i) {
            put_str(out, s);
        } else if let Some(nested) = a.array_at(i) {
            put_array(out, nested);
        } else if let Some(v) = a.get(i) {
            v.put_scalar(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::String("llama".into()))
            .set("llama.block_count", Value::U32(2))
            .set("f", Value::F64(0.5))
            .set(
                "tokenizer.ggml.tokens",
                Value::array(
                    crate::ValueType::String,
                    vec![Value::String("a".into()), Value::String("b".into())],
                )
                .unwrap(),
            );
        w.add_f32("w", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.])
            .unwrap();
        w.add_tensor("q", &[32], GgmlType::Q8_0, vec![7u8; 34])
            .unwrap();
        w
    }

    #[test]
    fn round_trip() {
        let bytes = sample().to_bytes();
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.require_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_f64("f"), Some(0.5));
        let toks = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks.str_at(1), Some("b"));
        let w = f.tensor("w").unwrap();
        assert_eq!(w.dims(), &[4, 2]);
        assert_eq!(w.data.len(), 32);
        assert_eq!(f32::from_le_bytes(w.data[28..32].try_into().unwrap()), 8.0);
        let q = f.tensor("q").unwrap();
        assert_eq!(q.ty(), GgmlType::Q8_0);
        assert_eq!(q.data, &[7u8; 34][..]);
        assert_eq!((f.data_offset + q.info.offset) % 32, 0);
    }

    #[test]
    fn arrays_of_every_kind_round_trip() {
        use crate::ValueType as T;
        let arrays = [
            Value::array(T::I32, vec![Value::I32(-3), Value::I32(7)]),
            Value::array(T::F32, vec![Value::F32(0.25)]),
            Value::array(T::Bool, vec![Value::Bool(true), Value::Bool(false)]),
            Value::array(T::U64, vec![]),
            Value::array(
                T::String,
                vec![Value::String("".into()), Value::String("é".into())],
            ),
            Value::array(
                T::Array,
                vec![Value::array(T::U8, vec![Value::U8(9)]).unwrap()],
            ),
        ];
        let mut w = GgufWriter::new();
        for (i, a) in arrays.iter().enumerate() {
            w.set(&format!("a{i}"), a.clone().unwrap());
        }
        let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
        for (i, a) in arrays.iter().enumerate() {
            assert_eq!(f.get(&format!("a{i}")), a.as_ref(), "array {i}");
        }
        let strings = f.get("a4").unwrap().as_array().unwrap();
        assert_eq!(
            (strings.str_at(0), strings.str_at(1)),
            (Some(""), Some("é"))
        );
        assert_eq!(
            f.get("a0").unwrap().as_array().unwrap().get(0),
            Some(Value::I32(-3))
        );
        // Mixed element types are refused.
        assert!(Value::array(T::I32, vec![Value::U8(1)]).is_none());
    }

    #[test]
    fn a_streamed_file_equals_the_one_written_at_once() {
        let at_once = sample();
        let mut meta = sample();
        meta.tensors.clear();
        let table = [
            TensorHeader {
                name: "w".into(),
                dims: vec![4, 2],
                ty: GgmlType::F32,
            },
            TensorHeader {
                name: "q".into(),
                dims: vec![32],
                ty: GgmlType::Q8_0,
            },
        ];
        let mut s = meta.stream_to(&table, Vec::new()).unwrap();
        s.put("w", &at_once.tensors[0].data).unwrap();
        // Out of order, or the wrong size: refused, nothing written for it.
        assert!(s.put("w", &[0u8; 34]).is_err());
        let mut s = meta.stream_to(&table, Vec::new()).unwrap();
        s.put("w", &at_once.tensors[0].data).unwrap();
        assert!(s.put("q", &[7u8; 33]).is_err());
        // The refused tensor is still owed: the file cannot be finished without it.
        assert!(s.finish().is_err());
        let mut s = meta.stream_to(&table, Vec::new()).unwrap();
        s.put("w", &at_once.tensors[0].data).unwrap();
        s.put("q", &[7u8; 34]).unwrap();
        assert!(s.put("x", &[]).is_err());
        let mut s = meta.stream_to(&table, Vec::new()).unwrap();
        s.put("w", &at_once.tensors[0].data).unwrap();
        s.put("q", &[7u8; 34]).unwrap();
        assert_eq!(s.finish().unwrap(), at_once.to_bytes());
        // Unfinished, a table that does not fit its types, tensors held by the writer.
        assert!(meta
            .stream_to(&table, Vec::new())
            .unwrap()
            .finish()
            .is_err());
        let mut odd = table.clone();
        odd[1].dims = vec![31];
        assert!(meta.stream_to(&odd, Vec::new()).is_err());
        let mut twice = table.clone();
        twice[1].name = "w".into();
        assert!(meta.stream_to(&twice, Vec::new()).is_err());
        assert!(at_once.stream_to(&table, Vec::new()).is_err());
    }

    #[test]
    fn writer_rejects_wrong_sizes_and_duplicates() {
        let mut w = GgufWriter::new();
        assert!(w
            .add_tensor("x", &[32], GgmlType::Q8_0, vec![0; 33])
            .is_err());
        assert!(w
            .add_tensor("x", &[31], GgmlType::Q8_0, vec![0; 34])
            .is_err());
        w.add_f32("x", &[1], &[1.0]).unwrap();
        assert!(w.add_f32("x", &[1], &[1.0]).is_err());
    }
}
