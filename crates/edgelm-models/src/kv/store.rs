//! Block storage of one layer group: every layer's keys and values for `n_blocks` blocks of
//! `block_len` positions, and the bookkeeping of which blocks are held, cached or free.

use super::{KvType, KvTypes};
use edgelm_kernels::{BlockQ4_0, BlockQ8_0, Compute, KvPlane, KV_BLOCK};
use edgelm_quant::{q4_0, q8_0};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::collections::BTreeSet;
use std::ops::Range;

/// Fewest blocks a task of [`Plane::write_rows`] encodes (a block takes ~0.1 µs).
const PARALLEL_BLOCKS: usize = 32;

/// Keys or values of one layer, slot after slot (`kv_dim` values each), in the cache's type;
/// quantized types hold whole blocks of [`KV_BLOCK`] values (the planner checks the widths).
#[derive(Debug)]
enum Plane {
    F32(Vec<f32>),
    /// f16 bit patterns.
    F16(Vec<u16>),
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
}

impl Plane {
    /// `n` zeroed values: the allocator maps them lazily, so memory becomes resident only as
    /// blocks are first written, and freed blocks are reused lowest-first.
    fn zeroed(ty: KvType, n: usize) -> Plane {
        let blocks = n / KV_BLOCK;
        match ty {
            KvType::F32 => Plane::F32(vec![0.0; n]),
            KvType::F16 => Plane::F16(vec![0; n]),
            KvType::Q8_0 => Plane::Q8_0(vec![BlockQ8_0([0; 34]); blocks]),
            KvType::Q4_0 => Plane::Q4_0(vec![BlockQ4_0([0; 18]); blocks]),
        }
    }

    /// Stores `x` from value `at` (quantized planes: a block boundary).
    fn write(&mut self, at: usize, x: &[f32]) {
        let block = |i: usize| -> &[f32; KV_BLOCK] {
            x[i * KV_BLOCK..(i + 1) * KV_BLOCK]
                .try_into()
                .expect("whole blocks")
        };
        match self {
            Plane::F32(p) => p[at..at + x.len()].copy_from_slice(x),
            // Converted eight at a time (F16C), not through a call per value: a decoded
            // token's keys and values of every layer pass here.
            Plane::F16(p) => p[at..at + x.len()]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(x),
            Plane::Q8_0(p) => {
                for (i, b) in p[at / KV_BLOCK..][..x.len() / KV_BLOCK]
                    .iter_mut()
                    .enumerate()
                {
                    q8_0::quantize_block_fitted(block(i), &mut b.0);
                }
            }
            Plane::Q4_0(p) => {
                for (i, b) in p[at / KV_BLOCK..][..x.len() / KV_BLOCK]
                    .iter_mut()
                    .enumerate()
                {
                    q4_0::quantize_block_fitted(block(i), &mut b.0);
                }
            }
        }
    }

    /// Stores row `t` of `rows` (`width` values each) at slot `slots[t]` (a token of a chunk,
    /// or the one a decoding step writes). Quantized planes encode a chunk's rows across the
    /// pool first (their least-squares rounding is a prompt's largest serial cost otherwise),
    /// then copy the blocks into place; a few blocks (a decoded token's) take less time than
    /// a fork/join and are encoded straight into their slots.
    fn write_rows(&mut self, c: &Compute, slots: &[usize], width: usize, rows: &[f32]) {
        fn store<B: Copy + Send>(
            c: &Compute,
            plane: &mut [B],
            slots: &[usize],
            per_row: usize,
            rows: &[f32],
            zero: B,
            encode: &(dyn Fn(&[f32; KV_BLOCK], &mut B) + Sync),
        ) {
            fn whole(x: &[f32]) -> &[f32; KV_BLOCK] {
                x.try_into().expect("whole blocks")
            }
            let n_blocks = rows.len() / KV_BLOCK;
            if n_blocks <= PARALLEL_BLOCKS {
                for (&slot, row) in slots.iter().zip(rows.chunks_exact(per_row * KV_BLOCK)) {
                    let dst = &mut plane[slot * per_row..][..per_row];
                    for (b, x) in dst.iter_mut().zip(row.chunks_exact(KV_BLOCK)) {
                        encode(whole(x), b);
                    }
                }
                return;
            }
            let mut encoded = vec![zero; n_blocks];
            let per_task = n_blocks.div_ceil(4 * c.n_threads()).max(PARALLEL_BLOCKS);
            c.par_chunks_mut(&mut encoded, per_task, &|task, blocks| {
                let first = task * per_task * KV_BLOCK;
                for (b, x) in blocks.iter_mut().zip(rows[first..].chunks_exact(KV_BLOCK)) {
                    encode(whole(x), b);
                }
            });
            for (&slot, row) in slots.iter().zip(encoded.chunks_exact(per_row)) {
                plane[slot * per_row..][..per_row].copy_from_slice(row);
            }
        }
        let per_row = width / KV_BLOCK;
        // The rounding on the SIMD path: the same bits as `quantize_block_fitted`'s (`write`).
        let fitted = |x: &[f32; KV_BLOCK], (lo, hi): (i32, i32)| {
            let mut q = [0i8; KV_BLOCK];
            (edgelm_kernels::fit_symmetric(c.isa(), x, lo, hi, &mut q), q)
        };
        match self {
            Plane::Q8_0(p) => store(c, p, slots, per_row, rows, BlockQ8_0([0; 34]), &|x, b| {
                let (d, q) = fitted(x, q8_0::LEVELS);
                q8_0::pack(d, &q, &mut b.0)
            }),
            Plane::Q4_0(p) => store(c, p, slots, per_row, rows, BlockQ4_0([0; 18]), &|x, b| {
                let (d, q) = fitted(x, q4_0::LEVELS);
                q4_0::pack(d, &q, &mut b.0)
            }),
            Plane::F32(_) | Plane::F16(_) => {
                for (&slot, row) in slots.iter().zip(rows.chunks_exact(width)) {
                    self.write(slot * width, row);
                }
            }
        }
    }

    /// Copies values `src` to value `dst` (block boundaries for quantized planes).
    fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        let blocks = |r: &Range<usize>| r.start / KV_BLOCK..r.end / KV_BLOCK;
        match self {
            Plane::F32(p) => p.copy_within(src, dst),
            Plane::F16(p) => p.copy_within(src, dst),
            Plane::Q8_0(p) => p.copy_within(blocks(&src), dst / KV_BLOCK),
            Plane::Q4_0(p) => p.copy_within(blocks(&src), dst / KV_BLOCK),
        }
    }

    /// Appends `n` values from `at`, raw and little-endian, as the type stores them.
    fn save(&self, at: usize, n: usize, out: &mut Vec<u8>) {
        match self {
            Plane::F32(p) => p[at..at + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Plane::F16(p) => p[at..at + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Plane::Q8_0(p) => p[at / KV_BLOCK..(at + n) / KV_BLOCK]
                .iter()
                .for_each(|b| out.extend_from_slice(&b.0)),
            Plane::Q4_0(p) => p[at / KV_BLOCK..(at + n) / KV_BLOCK]
                .iter()
                .for_each(|b| out.extend_from_slice(&b.0)),
        }
    }

    /// The inverse of [`Plane::save`]: `bytes` holds exactly `n` values.
    fn load(&mut self, at: usize, n: usize, bytes: &[u8]) {
        match self {
            Plane::F32(p) => p[at..at + n]
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(d, c)| *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Plane::F16(p) => p[at..at + n]
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(d, c)| *d = u16::from_le_bytes([c[0], c[1]])),
            Plane::Q8_0(p) => p[at / KV_BLOCK..(at + n) / KV_BLOCK]
                .iter_mut()
                .zip(bytes.chunks_exact(34))
                .for_each(|(d, c)| d.0.copy_from_slice(c)),
            Plane::Q4_0(p) => p[at / KV_BLOCK..(at + n) / KV_BLOCK]
                .iter_mut()
                .zip(bytes.chunks_exact(18))
                .for_each(|(d, c)| d.0.copy_from_slice(c)),
        }
    }

    /// Widens `out.len()` values from `at` into `out`.
    fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            Plane::F32(p) => out.copy_from_slice(&p[at..at + out.len()]),
            Plane::F16(p) => p[at..at + out.len()]
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(out),
            Plane::Q8_0(p) => {
                for (b, o) in p[at / KV_BLOCK..]
                    .iter()
                    .zip(out.chunks_exact_mut(KV_BLOCK))
                {
                    q8_0::dequantize_block(&b.0, o.try_into().expect("whole blocks"));
                }
            }
            Plane::Q4_0(p) => {
                for (b, o) in p[at / KV_BLOCK..]
                    .iter()
                    .zip(out.chunks_exact_mut(KV_BLOCK))
                {
                    q4_0::dequantize_block(&b.0, o.try_into().expect("whole blocks"));
                }
            }
        }
    }

    /// The plane from value `at` on (a block boundary for quantized planes).
    fn from(&self, at: usize) -> KvPlane<'_> {
        match self {
            Plane::F32(p) => KvPlane::F32(&p[at..]),
            Plane::F16(p) => KvPlane::F16(&p[at..]),
            Plane::Q8_0(p) => KvPlane::Q8_0(&p[at / KV_BLOCK..]),
            Plane::Q4_0(p) => KvPlane::Q4_0(&p[at / KV_BLOCK..]),
        }
    }
}

#[derive(Debug)]
struct LayerRows {
    kv_dim: usize,
    keys: Plane,
    values: Plane,
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
        types: KvTypes,
    ) -> Group {
        Group {
            window,
            block_len,
            layers: kv_dims
                .iter()
                .map(|&kv_dim| LayerRows {
                    kv_dim,
                    keys: Plane::zeroed(types.k, n_blocks * block_len * kv_dim),
                    values: Plane::zeroed(types.v, n_blocks * block_len * kv_dim),
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
            let from = at(src)..at(src) + n * l.kv_dim;
            l.keys.copy_within(from.clone(), at(dst));
            l.values.copy_within(from, at(dst));
        }
    }

    /// Store the key and value of slot `slot` (block · block_len + offset) of layer `layer`,
    /// with the scalar rounding: the reference `write_rows` is tested against.
    #[cfg(test)]
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        let d = l.kv_dim;
        l.keys.write(slot * d, &k[..d]);
        l.values.write(slot * d, &v[..d]);
    }

    /// [`Group::write`] for many slots at once, token `t`'s key and value rows at `slots[t]`.
    pub fn write_rows(&mut self, c: &Compute, layer: usize, slots: &[usize], k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        let d = l.kv_dim;
        l.keys.write_rows(c, slots, d, &k[..slots.len() * d]);
        l.values.write_rows(c, slots, d, &v[..slots.len() * d]);
    }

    /// Passes the key of slot `slot` of layer `layer`, widened into `row`, through `f` and
    /// stores it back.
    pub fn update_key(
        &mut self,
        layer: usize,
        slot: usize,
        row: &mut Vec<f32>,
        f: &mut dyn FnMut(&mut [f32]),
    ) {
        let l = &mut self.layers[layer];
        row.resize(l.kv_dim, 0.0);
        l.keys.read(slot * l.kv_dim, row);
        f(row);
        l.keys.write(slot * l.kv_dim, row);
    }

    /// Key widths of the group's layers.
    pub fn kv_dims(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().map(|l| l.kv_dim)
    }

    /// Appends slot `slot` of layer `layer`: its key, then its value, raw.
    pub fn save_slot(&self, layer: usize, slot: usize, out: &mut Vec<u8>) {
        let l = &self.layers[layer];
        l.keys.save(slot * l.kv_dim, l.kv_dim, out);
        l.values.save(slot * l.kv_dim, l.kv_dim, out);
    }

    /// Sets slot `slot` of layer `layer` from bytes [`Group::save_slot`] wrote: `key_bytes`
    /// of key, then the value.
    pub fn load_slot(&mut self, layer: usize, slot: usize, bytes: &[u8], key_bytes: usize) {
        let l = &mut self.layers[layer];
        let (k, v) = bytes.split_at(key_bytes);
        l.keys.load(slot * l.kv_dim, l.kv_dim, k);
        l.values.load(slot * l.kv_dim, l.kv_dim, v);
    }

    /// Layer `layer`'s keys and values from column `col` of slot 0, and the values between
    /// slots.
    pub fn planes(&self, layer: usize, col: usize) -> (KvPlane<'_>, KvPlane<'_>, usize) {
        let l = &self.layers[layer];
        (l.keys.from(col), l.values.from(col), l.kv_dim)
    }

    /// How many sequences hold `b`.
    pub fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// The prefix index no longer sees `b` (about to be rewritten by its only holder); its key,
    /// for the caller to drop from the index.
    pub fn uncache(&mut self, b: u32) -> Option<u64> {
        self.cached[b as usize].take()
    }
}
