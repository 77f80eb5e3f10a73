//! Block storage of one layer group: every layer's keys and values for `n_blocks` blocks of
//! `block_len` positions, and the bookkeeping of which blocks are held, cached or free.

use super::KvType;
use edgelm_kernels::KvRow;
use half::f16;
use std::collections::BTreeSet;

/// Keys and values of one layer, slot after slot (`kv_dim` values each), in the cache's type.
#[derive(Debug)]
enum Rows {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// f16 bit patterns.
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
}

impl Rows {
    /// Zeroed rows: the allocator maps them lazily, so memory becomes resident only as blocks
    /// are first written, and freed blocks are reused lowest-first.
    fn zeroed(ty: KvType, n: usize) -> Rows {
        match ty {
            KvType::F32 => Rows::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            KvType::F16 => Rows::F16 {
                k: vec![0; n],
                v: vec![0; n],
            },
        }
    }

    fn write(&mut self, at: usize, key: &[f32], value: &[f32]) {
        fn half(dst: &mut [u16], src: &[f32]) {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = f16::from_f32(*s).to_bits());
        }
        match self {
            Rows::F32 { k, v } => {
                k[at..at + key.len()].copy_from_slice(key);
                v[at..at + value.len()].copy_from_slice(value);
            }
            Rows::F16 { k, v } => {
                half(&mut k[at..at + key.len()], key);
                half(&mut v[at..at + value.len()], value);
            }
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Rows::F32 { k, v } => {
                k.copy_within(src.clone(), dst);
                v.copy_within(src, dst);
            }
            Rows::F16 { k, v } => {
                k.copy_within(src.clone(), dst);
                v.copy_within(src, dst);
            }
        }
    }

    /// Appends `n` values of keys then `n` of values from `at`, little-endian in the cache's type.
    fn save(&self, at: usize, n: usize, out: &mut Vec<u8>) {
        match self {
            Rows::F32 { k, v } => {
                for x in k[at..at + n].iter().chain(&v[at..at + n]) {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Rows::F16 { k, v } => {
                for x in k[at..at + n].iter().chain(&v[at..at + n]) {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }

    /// The inverse of [`Rows::save`]: `bytes` holds exactly `n` keys then `n` values.
    fn load(&mut self, at: usize, n: usize, bytes: &[u8]) {
        match self {
            Rows::F32 { k, v } => {
                let mut it = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                k[at..at + n]
                    .iter_mut()
                    .for_each(|d| *d = it.next().unwrap_or(0.0));
                v[at..at + n]
                    .iter_mut()
                    .for_each(|d| *d = it.next().unwrap_or(0.0));
            }
            Rows::F16 { k, v } => {
                let mut it = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]));
                k[at..at + n]
                    .iter_mut()
                    .for_each(|d| *d = it.next().unwrap_or(0));
                v[at..at + n]
                    .iter_mut()
                    .for_each(|d| *d = it.next().unwrap_or(0));
            }
        }
    }

    fn from(&self, at: usize) -> KvRow<'_> {
        match self {
            Rows::F32 { k, v } => KvRow::F32(&k[at..], &v[at..]),
            Rows::F16 { k, v } => KvRow::F16(&k[at..], &v[at..]),
        }
    }
}

#[derive(Debug)]
struct LayerRows {
    kv_dim: usize,
    rows: Rows,
}

/// Layers that share a window (or none) share block tables: one block holds `block_len`
/// positions of every layer of the group.
#[derive(Debug)]
pub(super) struct Group {
    /// Keys `p - window + 1 ..= p` are read for position `p`; None reads all.
    pub window: Option<usize>,
    block_len: usize,
    layers: Vec<LayerRows>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// Per block: the prefix-index key of the node that holds it, if any.
    cached: Vec<Option<u64>>,
    /// When each evictable block became unreferenced (its key in `evictable`).
    released_at: Vec<u64>,
    /// Unreferenced and uncached, lowest last so it is taken first.
    free: Vec<u32>,
    /// Unreferenced but cached, oldest first.
    evictable: BTreeSet<(u64, u32)>,
}

impl Group {
    pub fn new(
        window: Option<usize>,
        kv_dims: &[usize],
        n_blocks: usize,
        block_len: usize,
        ty: KvType,
    ) -> Group {
        Group {
            window,
            block_len,
            layers: kv_dims
                .iter()
                .map(|&kv_dim| LayerRows {
                    kv_dim,
                    rows: Rows::zeroed(ty, n_blocks * block_len * kv_dim),
                })
                .collect(),
            refs: vec![0; n_blocks],
            cached: vec![None; n_blocks],
            released_at: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            evictable: BTreeSet::new(),
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that could be handed out now: free ones and cached ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn n_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// A block for one holder: a free one, else the least recently released cached one, whose
    /// prefix-index key is returned so the caller can drop it from the index.
    pub fn take(&mut self) -> Option<(u32, Option<u64>)> {
        let (b, evicted) = match self.free.pop() {
            Some(b) => (b, None),
            None => {
                let (_, b) = self.evictable.pop_first()?;
                (b, self.cached[b as usize].take())
            }
        };
        self.refs[b as usize] = 1;
        Some((b, evicted))
    }

    /// One more holder of `b` (a fork, or a sequence adopting a cached prefix).
    pub fn retain(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&(self.released_at[i], b));
        }
        self.refs[i] += 1;
    }

    /// One holder fewer; an unheld block stays cached (evictable) if the index has it.
    pub fn release(&mut self, b: u32, now: u64) {
        let i = b as usize;
        debug_assert!(self.refs[i] > 0, "block {b} released more often than held");
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.cached[i].is_some() {
                self.released_at[i] = now;
                self.evictable.insert((now, b));
            } else {
                self.free.push(b);
            }
        }
    }

    /// Whether writing into `b` must copy it first: another holder or the index sees it.
    pub fn is_shared(&self, b: u32) -> bool {
        self.refs[b as usize] > 1 || self.cached[b as usize].is_some()
    }

    pub fn cached_key(&self, b: u32) -> Option<u64> {
        self.cached[b as usize]
    }

    /// The index now holds `b` (a full block of a sequence that holds it).
    pub fn set_cached(&mut self, b: u32, key: u64) {
        self.cached[b as usize] = Some(key);
    }

    /// Copy the first `n` slots of block `src` into block `dst`, every layer.
    pub fn copy_slots(&mut self, src: u32, dst: u32, n: usize) {
        for l in &mut self.layers {
            let at = |b: u32| b as usize * self.block_len * l.kv_dim;
            l.rows.copy_within(at(src)..at(src) + n * l.kv_dim, at(dst));
        }
    }

    /// Store the key and value of slot `slot` (block · block_len + offset) of layer `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        let d = l.kv_dim;
        l.rows.write(slot * d, &k[..d], &v[..d]);
    }

    /// Key widths of the group's layers.
    pub fn kv_dims(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().map(|l| l.kv_dim)
    }

    /// Appends slot `slot` of layer `layer`: its key, then its value, raw.
    pub fn save_slot(&self, layer: usize, slot: usize, out: &mut Vec<u8>) {
        let l = &self.layers[layer];
        l.rows.save(slot * l.kv_dim, l.kv_dim, out);
    }

    /// Sets slot `slot` of layer `layer` from bytes [`Group::save_slot`] wrote.
    pub fn load_slot(&mut self, layer: usize, slot: usize, bytes: &[u8]) {
        let l = &mut self.layers[layer];
        l.rows.load(slot * l.kv_dim, l.kv_dim, bytes);
    }

    /// Layer `layer`'s rows from column `col` of slot 0, and the stride between slots.
    pub fn rows(&self, layer: usize, col: usize) -> (KvRow<'_>, usize) {
        let l = &self.layers[layer];
        (l.rows.from(col), l.kv_dim)
    }

    #[cfg(test)]
    pub fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }
}
