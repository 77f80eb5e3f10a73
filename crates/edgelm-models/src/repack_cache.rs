//! The interleaved layout paid for once: the weights a compute context repacks
//! ([`edgelm_kernels::Compute::interleave_into`]) are written on the first run to a cache file
//! beside the model and mapped on later runs, so a run starts without repacking and without
//! faulting in the original pages of those weights.
//!
//! File `MODEL.edgelm-repack` (little-endian): magic `EDGELMRP`, the layout version
//! ([`edgelm_kernels::interleave::LAYOUT_VERSION`]) as u32, the tensor count as u32, the model's
//! fingerprint as u64; then per tensor its name (u32 length + UTF-8), GGML type (u32), rows and
//! cols (u64 each), offset and length of its bytes (u64 each; offsets 64-byte aligned); then the
//! bytes. A file that does not parse, was made for another layout version or another model, or
//! lacks a tensor this context repacks is rewritten.
//!
//! The fingerprint hashes the file's length, its header (metadata and tensor table) and the
//! first and last 4 KiB of every tensor: a requantized or edited model changes it, a copied one
//! does not. Hashing every byte would read the whole model at each load — the cost the cache
//! exists to avoid.

use crate::linear::WeightRef;
use crate::Transformer;
use edgelm_gguf::{GgufFile, MappedFile};
use edgelm_kernels::interleave::LAYOUT_VERSION;
use edgelm_kernels::Compute;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"EDGELMRP";
const ALIGN: u64 = 64;
/// Bytes hashed at each end of every tensor.
const SAMPLE: usize = 4096;

/// What [`attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepackCache {
    /// This context repacks nothing (the precise path, or no interleavable weights).
    NotNeeded,
    /// The cache was valid and is mapped: `tensors` weights, `bytes` bytes.
    Mapped {
        path: PathBuf,
        tensors: usize,
        bytes: u64,
    },
    /// The cache was missing or stale and has been written (then mapped).
    Written {
        path: PathBuf,
        tensors: usize,
        bytes: u64,
    },
    /// No cache could be written (read-only directory, full disk…): weights are repacked in
    /// memory on first use, as without a cache.
    Unavailable { path: PathBuf, reason: String },
}

/// Where the cache of the model at `model_path` lives.
pub fn cache_path(model_path: &Path) -> PathBuf {
    let mut name = model_path.as_os_str().to_owned();
    name.push(".edgelm-repack");
    PathBuf::from(name)
}

/// A 64-bit hash of the model file's identity (see the module note).
pub fn fingerprint(file: &GgufFile) -> u64 {
    let bytes = file.bytes();
    let mut h = Hasher::default();
    h.write(&(bytes.len() as u64).to_le_bytes());
    h.write(&bytes[..(file.data_offset as usize).min(bytes.len())]);
    for t in file.tensors() {
        if let Some(range) = file.tensor_range(&t.name) {
            let data = &bytes[range.start.min(bytes.len())..range.end.min(bytes.len())];
            h.write(&data[..data.len().min(SAMPLE)]);
            h.write(&data[data.len().saturating_sub(SAMPLE)..]);
        }
    }
    h.0
}

/// Word-at-a-time multiplicative hash: identity, not security.
#[derive(Default)]
struct Hasher(u64);

impl Hasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.mix(w);
        }
        let rest = chunks.remainder();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        self.mix(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
    }

    fn mix(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// One tensor of a cache file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ty: u32,
    pub rows: u64,
    pub cols: u64,
    pub offset: u64,
    pub len: u64,
}

/// The index of a cache file's bytes, if they are one for this layout version and `fp`.
pub fn parse_index(bytes: &[u8], fp: u64) -> Option<Vec<Entry>> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(8)? != MAGIC || r.u32()? != LAYOUT_VERSION {
        return None;
    }
    let n = r.u32()? as usize;
    if r.u64()? != fp {
        return None;
    }
    let mut entries = Vec::with_capacity(n.min(bytes.len() / 40));
    for _ in 0..n {
        let len = r.u32()? as usize;
        let name = std::str::from_utf8(r.take(len)?).ok()?.to_owned();
        let e = Entry {
            name,
            ty: r.u32()?,
            rows: r.u64()?,
            cols: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
        };
        let end = e.offset.checked_add(e.len)?;
        if end > bytes.len() as u64 || !e.offset.is_multiple_of(ALIGN) {
            return None;
        }
        entries.push(e);
    }
    Some(entries)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
}

/// The entry of `w` in `entries`, if it describes `w` exactly.
fn entry_for<'e>(entries: &'e [Entry], w: &WeightRef) -> Option<&'e Entry> {
    entries.iter().find(|e| {
        e.name == w.name
            && e.ty == w.ty as u32
            && e.rows == w.rows as u64
            && e.cols == w.cols as u64
            && e.len == w.n_bytes() as u64
    })
}

/// The weights of `model` that `c` repacks, each once.
fn wanted<'m>(model: &'m Transformer, c: &Compute) -> Vec<&'m WeightRef> {
    let mut seen = HashSet::new();
    model
        .matrices()
        .into_iter()
        .filter(|w| c.wants_interleaved(w.ty) && w.rows > 0 && seen.insert(w.name.clone()))
        .collect()
}

/// Map the repacked weights of `model` (opened from `model_path`) for `c` from the cache,
/// writing the cache first where it is missing or stale. Must run before the first forward
/// pass: a weight already repacked in memory keeps its copy.
pub fn attach(model: &Transformer, model_path: &Path, c: &Compute) -> RepackCache {
    let weights = wanted(model, c);
    if weights.is_empty() {
        return RepackCache::NotNeeded;
    }
    let path = cache_path(model_path);
    let fp = fingerprint(model.file());
    let bytes: u64 = weights.iter().map(|w| w.n_bytes() as u64).sum();
    if map_into(&path, fp, &weights) {
        let tensors = weights.len();
        return RepackCache::Mapped {
            path,
            tensors,
            bytes,
        };
    }
    if let Err(e) = write(&path, fp, &weights, c) {
        return RepackCache::Unavailable {
            path,
            reason: e.to_string(),
        };
    }
    if map_into(&path, fp, &weights) {
        let tensors = weights.len();
        RepackCache::Written {
            path,
            tensors,
            bytes,
        }
    } else {
        RepackCache::Unavailable {
            path,
            reason: "the cache written could not be read back".into(),
        }
    }
}

/// Give each of `weights` its bytes in the cache at `path`; false (touching no weight) unless
/// the cache is valid for them all.
fn map_into(path: &Path, fp: u64, weights: &[&WeightRef]) -> bool {
    let Ok(map) = MappedFile::open(path) else {
        return false;
    };
    let Some(entries) = parse_index(map.bytes(), fp) else {
        return false;
    };
    let Some(found) = weights
        .iter()
        .map(|w| entry_for(&entries, w))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let map = Arc::new(map);
    for (w, e) in weights.iter().zip(found) {
        w.use_mapped(map.clone(), e.offset as usize..(e.offset + e.len) as usize);
    }
    true
}

/// Repack `weights` for `c` into a new cache at `path`: written under a temporary name and
/// renamed when complete, so no reader ever sees a partial file.
fn write(path: &Path, fp: u64, weights: &[&WeightRef], c: &Compute) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = write_to(&tmp, fp, weights, c).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to(tmp: &Path, fp: u64, weights: &[&WeightRef], c: &Compute) -> std::io::Result<()> {
    let mut out = BufWriter::new(File::create(tmp)?);
    let index_len: u64 = weights
        .iter()
        .map(|w| 4 + w.name.len() as u64 + 4 + 4 * 8)
        .sum();
    let mut offset = (8 + 4 + 4 + 8 + index_len).next_multiple_of(ALIGN);
    out.write_all(MAGIC)?;
    out.write_all(&LAYOUT_VERSION.to_le_bytes())?;
    out.write_all(&(weights.len() as u32).to_le_bytes())?;
    out.write_all(&fp.to_le_bytes())?;
    let mut offsets = Vec::with_capacity(weights.len());
    for w in weights {
        out.write_all(&(w.name.len() as u32).to_le_bytes())?;
        out.write_all(w.name.as_bytes())?;
        out.write_all(&(w.ty as u32).to_le_bytes())?;
        let len = w.n_bytes() as u64;
        for v in [w.rows as u64, w.cols as u64, offset, len] {
            out.write_all(&v.to_le_bytes())?;
        }
        offsets.push(offset);
        offset = (offset + len).next_multiple_of(ALIGN);
    }
    for (w, at) in weights.iter().zip(offsets) {
        // One weight's copy at a time: the repack releases the original's pages as it goes.
        let data = w
            .repack(c)
            .ok_or_else(|| std::io::Error::other(format!("{} could not be repacked", w.name)))?;
        out.seek(SeekFrom::Start(at))?;
        out.write_all(&data)?;
    }
    out.seek(SeekFrom::Start(offset))?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.set_len(offset)?;
    file.sync_all()
}

/// The cache of the model at `model_path` as [`attach`] would find it, without touching the
/// model: its path and index if it is valid for this file and layout version.
pub fn inspect(model_path: &Path, file: &GgufFile) -> Option<(PathBuf, Vec<Entry>)> {
    let path = cache_path(model_path);
    let map = MappedFile::open(&path).ok()?;
    let entries = parse_index(map.bytes(), fingerprint(file))?;
    Some((path, entries))
}
