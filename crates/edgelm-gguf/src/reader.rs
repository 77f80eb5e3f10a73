//! Bounds-checked GGUF parser over a byte slice (mmap or owned).

use crate::{Array, GgmlType, GgufError, Result, Value, ValueType, DEFAULT_ALIGNMENT, MAGIC};
use std::collections::HashMap;
use std::path::Path;

/// Maximum tensor rank ggml supports.
const MAX_DIMS: u32 = 4;
/// Deepest array nesting accepted (GGUF files in the wild use 1).
const MAX_ARRAY_DEPTH: u32 = 2;
/// Most metadata array elements decoded from one file, all arrays together. Each becomes a
/// 32-byte [`Value`], so without this a 1-byte-per-element array would need 32× the file size in
/// memory (a hostile 100 MB file, 3.2 GB). Real files have at most a few million (a 262k
/// vocabulary's tokens, scores and types, plus merges).
const MAX_ARRAY_ITEMS: u64 = 1 << 24;

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One tensor's description; `offset` is relative to the start of the data section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

/// A zero-copy view of one tensor's bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn ty(&self) -> GgmlType {
        self.info.ty
    }
    pub fn dims(&self) -> &[u64] {
        &self.info.dims
    }
}

/// A parsed GGUF file. Metadata is decoded eagerly; tensor data stays in the mapping.
pub struct GgufFile {
    storage: Storage,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A whole file mapped read-only: for files edgelm writes beside models (the repack cache),
/// replaced only by renaming a new file over them, which leaves existing mappings intact.
pub struct MappedFile(memmap2::Mmap);

impl MappedFile {
    pub fn open(path: &Path) -> std::io::Result<MappedFile> {
        let file = std::fs::File::open(path)?;
        // SAFETY: read-only mapping; writers never modify such a file in place (see above).
        Ok(MappedFile(unsafe { memmap2::Mmap::map(&file) }?))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl GgufFile {
    /// Map and parse a file. The mapping is read-only and shared with the page cache.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; edgelm never writes model files it has mapped, and a
        // file truncated by another process underneath is outside what any mmap reader can guard.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(map))
    }

    /// Parse a file held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile> {
        let bytes = storage.bytes();
        let mut r = Cursor {
            bytes,
            pos: 0,
            array_items: 0,
            array_budget: MAX_ARRAY_ITEMS,
        };
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.count("tensor count", 4 + 4 + 4 + 8)?;
        let kv_count = r.count("metadata key count", 8 + 4)?;

        let mut metadata = Vec::with_capacity(kv_count);
        let mut metadata_index = HashMap::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let at = r.pos;
            let id = r.u32("metadata value type")?;
            let ty = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                id,
                offset: at as u64,
            })?;
            let value = r.value(&key, ty, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "metadata key",
                    name: key,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = metadata[i].1.as_u64().unwrap_or(0);
                if v == 0 || !v.is_power_of_two() || v > 1 << 20 {
                    return Err(GgufError::BadMetadata {
                        key: "general.alignment".into(),
                        reason: format!("{v} is not a power of two up to 1 MiB"),
                    });
                }
                v
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count);
        let mut tensor_index = HashMap::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let at = r.pos as u64;
            let n_dims = r.u32("tensor rank")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadTensor {
                    name,
                    reason: format!("rank {n_dims} at offset {at} (must be 1..={MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_at = r.pos as u64;
            let id = r.u32("tensor type")?;
            let ty = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                id,
                offset: type_at,
            })?;
            let offset = r.u64("tensor offset")?;
            let bad = |reason: String| GgufError::BadTensor {
                name: name.clone(),
                reason,
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            if dims[0] % ty.block_elems() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_elems()
                )));
            }
            let n_bytes = ty
                .bytes_for(n_elements)
                .ok_or_else(|| bad(format!("size of {n_elements} {ty} elements overflows")))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {offset} is not aligned to {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }

        let data_offset = align_up(r.pos as u64, alignment);
        let len = bytes.len() as u64;
        // Data range checks: each tensor lies inside the file, and no two overlap.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].offset);
        let mut prev_end = 0u64;
        let mut prev_name = "";
        for &i in &order {
            let t = &tensors[i];
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(GgufError::BadTensor {
                        name: t.name.clone(),
                        reason: format!(
                            "data [{} + {}, {} bytes) runs past the end of the file ({len} bytes); the file is truncated or corrupt",
                            data_offset, t.offset, t.n_bytes
                        ),
                    })
                }
            }
            if t.offset < prev_end {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    reason: format!(
                        "data at offset {} overlaps tensor {prev_name:?} (ends at {prev_end})",
                        t.offset
                    ),
                });
            }
            prev_end = t.offset + t.n_bytes;
            prev_name = &t.name;
        }

        Ok(GgufFile {
            storage,
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
        })
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// Required string metadata, with an error naming the key.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key).ok_or_else(|| missing(key, "a string"))
    }

    /// Required integer metadata, with an error naming the key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)
            .ok_or_else(|| missing(key, "a non-negative integer"))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (bounds were checked at parse time).
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.tensor_info(name)?;
        let data = &self.storage.bytes()[self.range_of(info)];
        Some(TensorView { info, data })
    }

    /// Where a tensor's bytes lie in [`GgufFile::bytes`]; lets owners of an `Arc<GgufFile>` keep
    /// weight handles without borrowing.
    pub fn tensor_range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        self.tensor_info(name).map(|info| self.range_of(info))
    }

    fn range_of(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.data_offset + info.offset) as usize;
        start..start + info.n_bytes as usize
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Drop `range`'s pages from this process's mapping once their bytes live elsewhere (a
    /// repacked copy): they stop counting as resident memory, and read back identical from
    /// the page cache if touched again.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Storage::Mmap(m) = &self.storage {
            if range.end <= m.len() && !range.is_empty() {
                // SAFETY: the mapping is private and read-only, so dropped pages come back with
                // the same bytes: no reference into it can observe a change.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        range.start,
                        range.len(),
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

fn missing(key: &str, what: &str) -> GgufError {
    GgufError::BadMetadata {
        key: key.into(),
        reason: format!("missing or not {what}"),
    }
}

pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Array elements decoded so far, and how many may be ([`MAX_ARRAY_ITEMS`]).
    array_items: u64,
    array_budget: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                what: what.into(),
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each needing at least `min_item` bytes: bounded by what is left, so a
    /// hostile count cannot trigger a huge allocation.
    fn count(&mut self, what: &str, min_item: u64) -> Result<usize> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let limit = self.remaining() as u64 / min_item.max(1);
        if n > limit {
            return Err(GgufError::Implausible {
                what: what.into(),
                value: n,
                offset: at,
                limit,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(GgufError::Implausible {
                what: format!("{what} length"),
                value: n,
                offset: at,
                limit: self.remaining() as u64,
            });
        }
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| GgufError::BadUtf8 { offset: at })
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.array::<1>(key)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::BadMetadata {
                            key: key.into(),
                            reason: format!("bool byte {b} at offset {at} (must be 0 or 1)"),
                        })
                    }
                }
            }
            ValueType::String => Value::String(self.string(key)?),
            ValueType::Array => {
                let at = self.pos as u64;
                let id = self.u32(key)?;
                let elem = ValueType::from_id(id).ok_or(GgufError::UnknownValueType {
                    key: key.into(),
                    id,
                    offset: at,
                })?;
                if elem == ValueType::Array && depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::BadMetadata {
                        key: key.into(),
                        reason: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    });
                }
                // Strings need at least their 8-byte length; nested arrays 12 bytes.
                let min = match elem {
                    ValueType::String => 8,
                    ValueType::Array => 12,
                    t => t.scalar_size().unwrap_or(1) as u64,
                };
                let count_at = self.pos as u64;
                let n = self.count(key, min)?;
                self.array_items += n as u64;
                if self.array_items > self.array_budget {
                    return Err(GgufError::Implausible {
                        what: format!("{key}: total metadata array elements"),
                        value: self.array_items,
                        offset: count_at,
                        limit: self.array_budget,
                    });
                }
                let mut items = Array::new(elem);
                match elem {
                    ValueType::String => {
                        for _ in 0..n {
                            let at = self.pos as u64;
                            let len = self.u64(key)?;
                            let b = self.take(len, key)?;
                            let s = std::str::from_utf8(b)
                                .map_err(|_| GgufError::BadUtf8 { offset: at })?;
                            items.push_str(s);
                        }
                    }
                    ValueType::Array => {
                        for _ in 0..n {
                            if let Value::Array(a) = self.value(key, elem, depth + 1)? {
                                items.push_array(a);
                            }
                        }
                    }
                    ValueType::Bool => {
                        for _ in 0..n {
                            // Checks the byte is 0 or 1.
                            let v = self.value(key, elem, depth + 1)?;
                            let _ = items.push(v);
                        }
                    }
                    _ => {
                        let size = elem.scalar_size().unwrap_or(1) as u64;
                        items.extend_scalars(self.take(n as u64 * size, key)?);
                    }
                }
                Value::Array(items)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a U8 array value (element type, count, elements).
    fn u8_array(len: u64) -> Vec<u8> {
        let mut b = (ValueType::U8 as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b.resize(b.len() + len as usize, 0);
        b
    }

    #[test]
    fn metadata_arrays_cannot_amplify_memory_without_bound() {
        // Found while fuzzing: every element became a 32-byte Value, so a file of N bytes of U8
        // array made the parser allocate 32 N bytes (70 MB file: a 2.2 GB allocation).
        let mut file = b"GGUF".to_vec();
        file.extend_from_slice(&3u32.to_le_bytes());
        file.extend_from_slice(&0u64.to_le_bytes());
        file.extend_from_slice(&1u64.to_le_bytes());
        file.extend_from_slice(&1u64.to_le_bytes());
        file.push(b'k');
        file.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
        file.extend_from_slice(&u8_array(MAX_ARRAY_ITEMS + 1));
        let err = GgufFile::from_bytes(file)
            .err()
            .expect("over the element budget");
        assert!(
            matches!(
                err,
                GgufError::Implausible {
                    limit: MAX_ARRAY_ITEMS,
                    ..
                }
            ),
            "{err}"
        );

        // The budget covers all arrays together (a small budget, to stay cheap).
        let bytes = [u8_array(6), u8_array(4), u8_array(1)].concat();
        let mut r = Cursor {
            bytes: &bytes,
            pos: 0,
            array_items: 0,
            array_budget: 10,
        };
        assert!(r.value("a", ValueType::Array, 0).is_ok());
        assert!(r.value("b", ValueType::Array, 0).is_ok());
        assert!(matches!(
            r.value("c", ValueType::Array, 0),
            Err(GgufError::Implausible {
                value: 11,
                limit: 10,
                ..
            })
        ));
    }
}
