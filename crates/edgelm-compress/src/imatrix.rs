//! Importance matrices: per input column of each weight matrix, the sum of squared activations
//! seen and how many rows (tokens) were summed. Read and written in llama.cpp's two formats, so
//! its `llama-imatrix` files work in `edgelm quantize` and ours in `llama-quantize`.
//!
//! - GGUF (`general.type = "imatrix"`): tensors `<weight>.in_sum2` (F32, `[cols, n_mat]`) and
//!   `<weight>.counts` (F32, `[1, n_mat]`), keys `imatrix.datasets` (strings),
//!   `imatrix.chunk_count` and `imatrix.chunk_size` (u32). edgelm adds `<weight>.in_sum` (F32,
//!   like `in_sum2`): the plain sums of the inputs, whose means let the rounding see the error a
//!   shared offset of the inputs multiplies (`llama-quantize` reads past tensors it does not know).
//! - Legacy `.dat`: i32 entry count; per entry an i32-length name, i32 `ncall`, i32 value count
//!   and the values, each `sum / count · ncall`; then optionally i32 chunk count and an
//!   i32-length dataset name.

use crate::{CompressError, Result};
use edgelm_gguf::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use std::collections::BTreeMap;
use std::path::Path;

/// One weight matrix's statistics; `counts` has one value per matrix (experts would have many).
/// `sums` are of squared inputs; `input_sums` of the inputs themselves, empty when the file had
/// none (llama.cpp's files, the legacy format).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    pub sums: Vec<f32>,
    pub counts: Vec<f32>,
    pub input_sums: Vec<f32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

const LEGACY_MAX_NAME: usize = 4096;

impl Imatrix {
    /// Reads either format (GGUF is recognized by its magic).
    pub fn read(path: &Path) -> Result<Imatrix> {
        let bytes = std::fs::read(path).map_err(|e| CompressError::io(path, e))?;
        let what = path.display().to_string();
        if bytes.starts_with(b"GGUF") {
            Self::from_gguf(GgufFile::from_bytes(bytes)?, &what)
        } else {
            Self::from_legacy(&bytes, &what)
        }
    }

    pub fn from_gguf(f: GgufFile, what: &str) -> Result<Imatrix> {
        let bad = |reason: String| CompressError::BadImatrix {
            what: what.into(),
            reason,
        };
        let mut m = Imatrix {
            chunk_count: f.get_u64("imatrix.chunk_count").unwrap_or(0) as u32,
            chunk_size: f.get_u64("imatrix.chunk_size").unwrap_or(0) as u32,
            ..Default::default()
        };
        if let Some(a) = f.get("imatrix.datasets").and_then(|v| v.as_array()) {
            m.datasets = (0..a.len())
                .filter_map(|i| a.str_at(i).map(str::to_owned))
                .collect();
        }
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = f
                .tensor(name)
                .ok_or_else(|| bad(format!("{name} is missing")))?;
            if t.ty() != GgmlType::F32 {
                return Err(bad(format!("{name} is {}, expected F32", t.ty())));
            }
            Ok(t.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        for info in f.tensors() {
            let Some(weight) = info.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = read(&info.name)?;
            let counts = read(&format!("{weight}.counts"))?;
            if counts.is_empty() || !sums.len().is_multiple_of(counts.len()) {
                return Err(bad(format!(
                    "{weight}: {} sums do not split into {} matrices",
                    sums.len(),
                    counts.len()
                )));
            }
            let in_sum = format!("{weight}.in_sum");
            let input_sums = match f.tensor(&in_sum) {
                Some(_) => read(&in_sum)?,
                None => Vec::new(),
            };
            if !input_sums.is_empty() && input_sums.len() != sums.len() {
                return Err(bad(format!(
                    "{weight}: {} input sums beside {} squared sums",
                    input_sums.len(),
                    sums.len()
                )));
            }
            m.entries.insert(
                weight.to_owned(),
                Entry {
                    sums,
                    counts,
                    input_sums,
                },
            );
        }
        if m.entries.is_empty() {
            return Err(bad("it holds no <tensor>.in_sum2 entries".into()));
        }
        Ok(m)
    }

    pub fn from_legacy(bytes: &[u8], what: &str) -> Result<Imatrix> {
        let bad = |reason: String| CompressError::BadImatrix {
            what: what.into(),
            reason: format!("not a GGUF or legacy imatrix file: {reason}"),
        };
        let mut pos = 0usize;
        let i32_at = |pos: &mut usize, field: &str| -> Result<i32> {
            let b = bytes
                .get(*pos..*pos + 4)
                .ok_or_else(|| bad(format!("truncated at {field} (offset {pos})")))?;
            *pos += 4;
            Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let n = i32_at(&mut pos, "the entry count")?;
        if n < 1 || n as usize > bytes.len() / 16 {
            return Err(bad(format!("implausible entry count {n}")));
        }
        let mut m = Imatrix::default();
        for _ in 0..n {
            let len = i32_at(&mut pos, "a name length")?;
            if len < 1 || len as usize > LEGACY_MAX_NAME {
                return Err(bad(format!("implausible name length {len}")));
            }
            let name = bytes
                .get(pos..pos + len as usize)
                .ok_or_else(|| bad("truncated in a name".into()))?;
            let name =
                String::from_utf8(name.to_vec()).map_err(|_| bad("a name is not UTF-8".into()))?;
            pos += len as usize;
            let ncall = i32_at(&mut pos, "ncall")?;
            let nval = i32_at(&mut pos, "a value count")?;
            if nval < 1 || nval as usize > (bytes.len() - pos) / 4 {
                return Err(bad(format!("{name}: implausible value count {nval}")));
            }
            let sums = bytes[pos..pos + 4 * nval as usize]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            pos += 4 * nval as usize;
            // Values are already means times ncall: counts of ncall make sums/counts the mean.
            m.entries.insert(
                name,
                Entry {
                    sums,
                    counts: vec![ncall.max(0) as f32],
                    input_sums: Vec::new(),
                },
            );
        }
        if pos < bytes.len() {
            m.chunk_count = i32_at(&mut pos, "the chunk count")?.max(0) as u32;
            if let Ok(len) = i32_at(&mut pos, "the dataset name length") {
                if let Some(name) = usize::try_from(len)
                    .ok()
                    .and_then(|l| bytes.get(pos..pos + l))
                {
                    m.datasets.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        Ok(m)
    }

    /// The mean squared input per column of `weight` (sums over counts), or None when the matrix
    /// was never seen; columns of a matrix never run (count 0) weigh 1, as llama.cpp reads them.
    pub fn importance(&self, weight: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(weight)?;
        let per = e.sums.len() / e.counts.len().max(1);
        let mut out = Vec::with_capacity(e.sums.len());
        for (j, &c) in e.counts.iter().enumerate() {
            let s = &e.sums[j * per..(j + 1) * per];
            if c > 0.0 {
                out.extend(s.iter().map(|v| v / c));
            } else {
                out.extend(std::iter::repeat_n(1.0, per));
            }
        }
        Some(out)
    }

    /// The mean input per column of `weight`, when the file holds input sums and every matrix
    /// was run (a column never seen has no mean to go by).
    pub fn input_means(&self, weight: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(weight)?;
        if e.input_sums.len() != e.sums.len() || e.counts.iter().any(|&c| c <= 0.0) {
            return None;
        }
        let per = e.sums.len() / e.counts.len().max(1);
        Some(
            e.input_sums
                .chunks(per.max(1))
                .zip(&e.counts)
                .flat_map(|(s, &c)| s.iter().map(move |v| v / c))
                .collect(),
        )
    }

    /// Adds `rows` rows of `x` (each `cols` wide) seen at the input of `weight`.
    pub fn accumulate(&mut self, weight: &str, x: &[f32], cols: usize, rows: usize) {
        // Looked up before inserting: no name is allocated on the per-projection path.
        if !self.entries.contains_key(weight) {
            let fresh = Entry {
                sums: vec![0.0; cols],
                counts: vec![0.0],
                input_sums: vec![0.0; cols],
            };
            self.entries.insert(weight.to_owned(), fresh);
        }
        let Some(e) = self.entries.get_mut(weight) else {
            return;
        };
        if e.sums.len() != cols || e.input_sums.len() != cols {
            return;
        }
        for row in x.chunks_exact(cols).take(rows) {
            for ((s2, s), v) in e.sums.iter_mut().zip(&mut e.input_sums).zip(row) {
                *s2 += v * v;
                *s += v;
            }
        }
        e.counts[0] += rows as f32;
    }

    pub fn to_gguf(&self) -> Result<GgufWriter> {
        let mut w = GgufWriter::new();
        w.set("general.type", Value::String("imatrix".into()));
        let datasets = self
            .datasets
            .iter()
            .map(|d| Value::String(d.clone()))
            .collect();
        if let Some(a) = Value::array(ValueType::String, datasets) {
            w.set("imatrix.datasets", a);
        }
        w.set("imatrix.chunk_count", Value::U32(self.chunk_count));
        w.set("imatrix.chunk_size", Value::U32(self.chunk_size));
        for (name, e) in &self.entries {
            let n_mat = e.counts.len() as u64;
            let cols = e.sums.len() as u64 / n_mat.max(1);
            w.add_f32(&format!("{name}.in_sum2"), &[cols, n_mat], &e.sums)?;
            w.add_f32(&format!("{name}.counts"), &[1, n_mat], &e.counts)?;
            if !e.input_sums.is_empty() {
                w.add_f32(&format!("{name}.in_sum"), &[cols, n_mat], &e.input_sums)?;
            }
        }
        Ok(w)
    }

    /// The legacy `.dat` bytes: each entry's means times the chunk count as `ncall`.
    pub fn to_legacy(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let ncall = self.chunk_count.max(1) as i32;
        out.extend((self.entries.len() as i32).to_le_bytes());
        for name in self.entries.keys() {
            out.extend((name.len() as i32).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(ncall.to_le_bytes());
            let means = self.importance(name).unwrap_or_default();
            out.extend((means.len() as i32).to_le_bytes());
            for v in &means {
                out.extend((v * ncall as f32).to_le_bytes());
            }
        }
        out.extend((self.chunk_count as i32).to_le_bytes());
        let dataset = self.datasets.first().map(String::as_str).unwrap_or("");
        out.extend((dataset.len() as i32).to_le_bytes());
        out.extend(dataset.as_bytes());
        out
    }

    /// Writes GGUF, or the legacy format when the path ends in `.dat` (as llama.cpp chooses).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = if path.extension().is_some_and(|e| e == "dat") {
            self.to_legacy()
        } else {
            self.to_gguf()?.to_bytes()
        };
        crate::write_atomically(path, |f| {
            use std::io::Write;
            f.write_all(&bytes)
                .map_err(|e| crate::CompressError::io(path, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Imatrix {
        let mut m = Imatrix {
            datasets: vec!["calib.txt".into()],
            chunk_count: 3,
            chunk_size: 512,
            ..Default::default()
        };
        m.accumulate(
            "blk.0.attn_q.weight",
            &[1.0, 2.0, 3.0, 4.0, -1.0, 0.5],
            3,
            2,
        );
        m.accumulate("blk.0.ffn_down.weight", &[2.0, 0.0], 2, 1);
        m
    }

    #[test]
    fn accumulates_mean_squares() {
        let m = sample();
        let imp = m.importance("blk.0.attn_q.weight").expect("entry");
        assert_eq!(
            imp,
            vec![(1.0 + 16.0) / 2.0, (4.0 + 1.0) / 2.0, (9.0 + 0.25) / 2.0]
        );
        assert!(m.importance("blk.9.attn_q.weight").is_none());
        let means = m.input_means("blk.0.attn_q.weight").expect("means");
        assert_eq!(
            means,
            vec![(1.0 + 4.0) / 2.0, (2.0 - 1.0) / 2.0, (3.0 + 0.5) / 2.0]
        );
    }

    #[test]
    fn gguf_round_trip() {
        let m = sample();
        let bytes = m.to_gguf().expect("writer").to_bytes();
        let back =
            Imatrix::from_gguf(GgufFile::from_bytes(bytes).expect("gguf"), "t").expect("read");
        assert_eq!(back, m);
    }

    /// The legacy format keeps means, not raw sums: importance survives exactly.
    #[test]
    fn legacy_round_trip() {
        let m = sample();
        let back = Imatrix::from_legacy(&m.to_legacy(), "t").expect("read");
        assert_eq!(back.datasets, m.datasets);
        // The legacy format has no place for input sums.
        assert!(back.input_means("blk.0.attn_q.weight").is_none());
        assert_eq!(back.chunk_count, 3);
        for name in m.entries.keys() {
            let (a, b) = (
                m.importance(name).expect("a"),
                back.importance(name).expect("b"),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{name}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn malformed_files_are_refused() {
        let good = sample().to_legacy();
        for cut in [0, 3, 4, 9, 30, good.len() - 40] {
            assert!(
                Imatrix::from_legacy(&good[..cut], "t").is_err(),
                "cut at {cut}"
            );
        }
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(Imatrix::from_legacy(&huge, "t").is_err());
        let mut w = GgufWriter::new();
        w.add_f32("x.in_sum2", &[4], &[1.0; 4]).expect("add");
        let e = Imatrix::from_gguf(GgufFile::from_bytes(w.to_bytes()).expect("gguf"), "t");
        assert!(e.unwrap_err().to_string().contains("x.counts is missing"));
        w.add_f32("x.counts", &[1], &[2.0]).expect("add");
        w.add_f32("x.in_sum", &[3], &[1.0; 3]).expect("add");
        let e = Imatrix::from_gguf(GgufFile::from_bytes(w.to_bytes()).expect("gguf"), "t");
        assert!(e.unwrap_err().to_string().contains("3 input sums beside 4"));
    }
}
