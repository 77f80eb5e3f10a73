//! Softmax attention of the query heads that share one key/value head (grouped-query
//! attention): each key and value row is fetched once and used by every head of the group.

use crate::{Compute, Isa};

/// One cached key and value row (one kv head's columns), as the cache stores them.
#[derive(Clone, Copy, Debug)]
pub enum KvRow<'a> {
    F32(&'a [f32], &'a [f32]),
    /// f16 bit patterns.
    F16(&'a [u16], &'a [u16]),
}

/// An element type of cached keys and values.
trait KvElem: Copy + 'static {
    fn to_f32(self) -> f32;
    /// The row's key and value pointers if it holds this type.
    fn of<'a>(row: KvRow<'a>) -> Option<(&'a [Self], &'a [Self])>;
    /// Scalar dot product (the reference order).
    fn dot(k: &[Self], q: &[f32]) -> f32 {
        k.iter().zip(q).map(|(k, q)| k.to_f32() * q).sum()
    }
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn of<'a>(row: KvRow<'a>) -> Option<(&'a [f32], &'a [f32])> {
        match row {
            KvRow::F32(k, v) => Some((k, v)),
            KvRow::F16(..) => None,
        }
    }
    fn dot(k: &[f32], q: &[f32]) -> f32 {
        crate::compute::scalar_dot(k, q)
    }
}

impl KvElem for u16 {
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
    fn of<'a>(row: KvRow<'a>) -> Option<(&'a [u16], &'a [u16])> {
        match row {
            KvRow::F16(k, v) => Some((k, v)),
            KvRow::F32(..) => None,
        }
    }
}

/// Register-tiled primitives of one ISA for key/value rows of type `E`, resolved statically
/// inside the attention loops.
trait VecOps<E: KvElem> {
    /// Query heads per score tile (beside four keys): as many as the registers hold.
    const TILE_HEADS: usize = 3;
    /// `out[r][t] = k[r] · q[t]` over `hd` values, `R ≤ 4` keys by `T ≤ TILE_HEADS` query rows.
    fn dots<const R: usize, const T: usize>(
        k: &[*const E; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    );
    /// `out[r] += Σ_j p[r][j] · v[j]` over rows of `hd` values.
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const E],
        hd: usize,
        out: &[*mut f32; R],
    );
    /// `row[i] ← e^(row[i] − shift)`, returning their sum.
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - shift).exp();
            sum += *s;
        }
        sum
    }
}

struct Scalar;
impl<E: KvElem> VecOps<E> for Scalar {
    fn dots<const R: usize, const T: usize>(
        k: &[*const E; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        for r in 0..R {
            for t in 0..T {
                // SAFETY: the caller passes rows of `hd` elements.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(k[r], hd),
                        std::slice::from_raw_parts(q[t], hd),
                    )
                };
                out[r][t] = E::dot(a, b);
            }
        }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const E],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        for r in 0..R {
            // SAFETY: the caller passes `v.len()` weights per row and rows of `hd` elements.
            let (w, o) = unsafe {
                (
                    std::slice::from_raw_parts(p[r], v.len()),
                    std::slice::from_raw_parts_mut(out[r], hd),
                )
            };
            for (wj, vj) in w.iter().zip(v) {
                // SAFETY: as above.
                let vj = unsafe { std::slice::from_raw_parts(*vj, hd) };
                o.iter_mut()
                    .zip(vj)
                    .for_each(|(o, v)| *o += wj * v.to_f32());
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl VecOps<f32> for Avx2 {
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2 and FMA.
        unsafe { crate::x86::avx2::exp_shifted(row, shift) }
    }
    fn dots<const R: usize, const T: usize>(
        k: &[*const f32; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2, FMA and
        // F16C; rows hold `hd` elements.
        unsafe { crate::x86::avx2::tile::<R, T>(k, q, hd, out) }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const f32],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        if !hd.is_multiple_of(16) {
            return <Scalar as VecOps<f32>>::weighted_rows(p, v, hd, out);
        }
        // SAFETY: as above; `hd` is a multiple of 16.
        unsafe { crate::x86::avx2::weighted_rows::<R>(p, v, hd, out) }
    }
}

#[cfg(target_arch = "x86_64")]
impl VecOps<u16> for Avx2 {
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2 and FMA.
        unsafe { crate::x86::avx2::exp_shifted(row, shift) }
    }
    fn dots<const R: usize, const T: usize>(
        k: &[*const u16; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        // SAFETY: as for f32 rows.
        unsafe { crate::x86::avx2::tile_f16::<R, T>(k, q, hd, out) }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const u16],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        if !hd.is_multiple_of(16) {
            return <Scalar as VecOps<u16>>::weighted_rows(p, v, hd, out);
        }
        // SAFETY: as for f32 rows.
        unsafe { crate::x86::avx2::weighted_rows_f16::<R>(p, v, hd, out) }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;
#[cfg(target_arch = "x86_64")]
impl VecOps<u16> for Avx512 {
    // 16 accumulators, 4 query and 1 key register of 32.
    const TILE_HEADS: usize = 4;
    fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        <Avx2 as VecOps<u16>>::exp_shifted(row, shift)
    }
    fn dots<const R: usize, const T: usize>(
        k: &[*const u16; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        // SAFETY: only instantiated when `Isa` is Avx512 (AVX-512 F with AVX2, FMA, F16C);
        // rows hold `hd` elements.
        unsafe { crate::x86::avx512_attention::tile_f16::<R, T>(k, q, hd, out) }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const u16],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        if !hd.is_multiple_of(32) {
            return <Avx2 as VecOps<u16>>::weighted_rows(p, v, hd, out);
        }
        // SAFETY: as above; `hd` is a multiple of 32.
        unsafe { crate::x86::avx512_attention::weighted_rows_f16::<R>(p, v, hd, out) }
    }
}

thread_local! {
    /// Value-row addresses of the current attention call.
    static VALUES: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cached rows of one kv head that one attention call reads, as a KV cache of blocks holds
/// them: position `p` lives in block `blocks[p / block_len]`, slot `p % block_len`, and slot `s`
/// of the storage starts `s·stride` elements into `rows` (whose slices start at the kv head's
/// first column). The keys read are positions `first .. first + n`; blocks before `first`'s are
/// never touched (a sliding window may have released them).
#[derive(Clone, Copy, Debug)]
pub struct KvBlocks<'a> {
    pub rows: KvRow<'a>,
    pub stride: usize,
    /// Positions per block: a power of two.
    pub block_len: usize,
    pub blocks: &'a [u32],
    pub first: usize,
    pub n: usize,
}

impl Compute {
    /// `out[r] = Σ_j softmax_j(scale · q[r]·k_j) · v_j` for each query head `r` (rows of `hd`
    /// values in `q` and `out`), over the keys of `kv` in position order. `scores` is
    /// caller-owned scratch so the hot path allocates nothing.
    ///
    /// Panics if `kv` names a block outside its rows or its block length is not a power of two
    /// (the cache's bug, not input).
    pub fn attend_heads(
        &self,
        q: &[f32],
        hd: usize,
        kv: &KvBlocks<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        out.iter_mut().for_each(|o| *o = 0.0);
        if kv.n == 0 || hd == 0 {
            return;
        }
        let f16 = matches!(kv.rows, KvRow::F16(..));
        match (self.isa(), f16) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2 | Isa::Avx512, false) => typed::<Avx2, f32>(q, hd, kv, scale, scores, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true) => typed::<Avx2, u16>(q, hd, kv, scale, scores, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, true) => typed::<Avx512, u16>(q, hd, kv, scale, scores, out),
            (_, false) => typed::<Scalar, f32>(q, hd, kv, scale, scores, out),
            (_, true) => typed::<Scalar, u16>(q, hd, kv, scale, scores, out),
        }
    }
}

/// Key and value addresses of a [`KvBlocks`], its block ids checked once per call.
#[derive(Clone, Copy)]
struct Keys<'a, E> {
    k: *const E,
    v: *const E,
    stride: usize,
    shift: u32,
    blocks: &'a [u32],
    first: usize,
}

impl<E> Keys<'_, E> {
    /// Key and value `j` (in range by construction).
    #[inline(always)]
    fn get(&self, j: usize) -> (*const E, *const E) {
        let p = self.first + j;
        let mask = (1usize << self.shift) - 1;
        let slot = ((self.blocks[p >> self.shift] as usize) << self.shift) | (p & mask);
        // SAFETY (of later reads): `typed` checked every block read lies inside the rows.
        (
            self.k.wrapping_add(slot * self.stride),
            self.v.wrapping_add(slot * self.stride),
        )
    }
}

/// [`attend`] over rows of type `E`, the type and every block read checked once.
fn typed<V: VecOps<E>, E: KvElem>(
    q: &[f32],
    hd: usize,
    kv: &KvBlocks<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (k, v) = E::of(kv.rows).expect("attention: one call reads one cache type");
    assert!(
        kv.block_len.is_power_of_two() && kv.stride >= hd,
        "attention: block length {} is not a power of two, or stride {} < head size {hd}",
        kv.block_len,
        kv.stride
    );
    let (b0, b1) = (
        kv.first / kv.block_len,
        (kv.first + kv.n - 1) / kv.block_len,
    );
    let ids = kv
        .blocks
        .get(b0..=b1)
        .expect("attention: the block table is shorter than its keys");
    let need = ids
        .iter()
        .map(|&b| (b as usize + 1) * kv.block_len)
        .max()
        .unwrap_or(0);
    let need = (need - 1) * kv.stride + hd;
    assert!(
        k.len() >= need && v.len() >= need,
        "attention: a block outside the cache rows"
    );
    let keys = Keys {
        k: k.as_ptr(),
        v: v.as_ptr(),
        stride: kv.stride,
        shift: kv.block_len.trailing_zeros(),
        blocks: kv.blocks,
        first: kv.first,
    };
    attend::<V, E>(q, hd, kv.n, &keys, scale, scores, out)
}

/// Keys per block of the online softmax: their scores stay in L1 between the two passes.
const KEY_BLOCK: usize = 64;

/// Online softmax over blocks of [`KEY_BLOCK`] keys: each block's scores, then its weights
/// against the running maximum (earlier output rescaled when the maximum grows), then its
/// values added in; one division by the running sum at the end. `out` starts zeroed.
fn attend<V: VecOps<E>, E: KvElem>(
    q: &[f32],
    hd: usize,
    n_keys: usize,
    kv: &Keys<'_, E>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let heads = q.len() / hd;
    scores.clear();
    scores.resize(heads * (KEY_BLOCK + 2), 0.0);
    let (block, stats) = scores.split_at_mut(heads * KEY_BLOCK);
    let (maxes, sums) = stats.split_at_mut(heads);
    maxes.fill(f32::NEG_INFINITY);
    VALUES.with_borrow_mut(|values| {
        for b0 in (0..n_keys).step_by(KEY_BLOCK) {
            let nb = (n_keys - b0).min(KEY_BLOCK);
            values.clear();
            // Scores four keys by up to `TILE_HEADS` heads at a time: each key row is loaded
            // once per tile of heads, each head once per four keys.
            let mut j0 = 0;
            while j0 < nb {
                let nk = (nb - j0).min(4);
                let mut keys = [std::ptr::null::<E>(); 4];
                for (i, k) in keys[..nk].iter_mut().enumerate() {
                    let (kj, vj) = kv.get(b0 + j0 + i);
                    *k = kj;
                    values.push(vj as usize);
                }
                let mut r0 = 0;
                while r0 < heads {
                    let nr = (heads - r0).min(V::TILE_HEADS);
                    let rows: [*const f32; 4] =
                        std::array::from_fn(|t| q[(r0 + t.min(nr - 1)) * hd..].as_ptr());
                    let mut put = |r: usize, t: usize, v: f32| {
                        block[(r0 + t) * KEY_BLOCK + j0 + r] = v * scale;
                    };
                    key_tile::<V, E>(&keys, nk, &rows, nr, hd, &mut put);
                    r0 += nr;
                }
                j0 += nk;
            }
            for r in 0..heads {
                let row = &mut block[r * KEY_BLOCK..r * KEY_BLOCK + nb];
                let max = row.iter().copied().fold(maxes[r], f32::max);
                // exp(-inf) = 0 on the first block, where output and sum are still zero.
                let rescale = (maxes[r] - max).exp();
                if rescale != 1.0 {
                    out[r * hd..(r + 1) * hd]
                        .iter_mut()
                        .for_each(|o| *o *= rescale);
                    sums[r] *= rescale;
                }
                sums[r] += V::exp_shifted(row, max);
                maxes[r] = max;
            }
            let vptrs: &[*const E] =
                // SAFETY: `usize` and `*const E` have the same size and alignment; the
                // addresses came from live value rows.
                unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) };
            let mut r0 = 0;
            while r0 < heads {
                let nr = (heads - r0).min(4);
                let p = |r: usize| block[(r0 + r.min(nr - 1)) * KEY_BLOCK..].as_ptr();
                let base = out.as_mut_ptr();
                // SAFETY: row r0 + r < heads lies inside `out`.
                let o = |r: usize| unsafe { base.add((r0 + r.min(nr - 1)) * hd) };
                match nr {
                    4 => V::weighted_rows::<4>(
                        &[p(0), p(1), p(2), p(3)],
                        vptrs,
                        hd,
                        &[o(0), o(1), o(2), o(3)],
                    ),
                    3 => V::weighted_rows::<3>(&[p(0), p(1), p(2)], vptrs, hd, &[o(0), o(1), o(2)]),
                    2 => V::weighted_rows::<2>(&[p(0), p(1)], vptrs, hd, &[o(0), o(1)]),
                    _ => V::weighted_rows::<1>(&[p(0)], vptrs, hd, &[o(0)]),
                }
                r0 += nr;
            }
        }
    });
    for (row, sum) in out.chunks_exact_mut(hd).zip(sums.iter()) {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One tile of scores: `nk ≤ 4` keys by `nr ≤ 4` query rows, reported through `put(key, row, v)`.
fn key_tile<V: VecOps<E>, E: KvElem>(
    keys: &[*const E; 4],
    nk: usize,
    rows: &[*const f32; 4],
    nr: usize,
    hd: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    fn go<V: VecOps<E>, E: KvElem, const R: usize, const T: usize>(
        keys: &[*const E; 4],
        rows: &[*const f32; 4],
        hd: usize,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        let k: [*const E; R] = std::array::from_fn(|i| keys[i]);
        let q: [*const f32; T] = std::array::from_fn(|i| rows[i]);
        let mut out = [[0f32; T]; R];
        V::dots::<R, T>(&k, &q, hd, &mut out);
        for (r, row) in out.iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                put(r, t, *v);
            }
        }
    }
    match (nk, nr) {
        (4, 4) => go::<V, E, 4, 4>(keys, rows, hd, put),
        (3, 4) => go::<V, E, 3, 4>(keys, rows, hd, put),
        (2, 4) => go::<V, E, 2, 4>(keys, rows, hd, put),
        (1, 4) => go::<V, E, 1, 4>(keys, rows, hd, put),
        (4, 3) => go::<V, E, 4, 3>(keys, rows, hd, put),
        (4, 2) => go::<V, E, 4, 2>(keys, rows, hd, put),
        (4, 1) => go::<V, E, 4, 1>(keys, rows, hd, put),
        (3, 3) => go::<V, E, 3, 3>(keys, rows, hd, put),
        (3, 2) => go::<V, E, 3, 2>(keys, rows, hd, put),
        (3, 1) => go::<V, E, 3, 1>(keys, rows, hd, put),
        (2, 3) => go::<V, E, 2, 3>(keys, rows, hd, put),
        (2, 2) => go::<V, E, 2, 2>(keys, rows, hd, put),
        (2, 1) => go::<V, E, 2, 1>(keys, rows, hd, put),
        (1, 3) => go::<V, E, 1, 3>(keys, rows, hd, put),
        (1, 2) => go::<V, E, 1, 2>(keys, rows, hd, put),
        _ => go::<V, E, 1, 1>(keys, rows, hd, put),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_attention_matches_plain_softmax_on_every_isa() {
        let mut seed = 0x5eed_u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        // Head sizes off and on the 16-lane tile, head counts off and on the 3- and 4-row
        // tiles, key counts off and on the 4-key tile.
        // Key counts across several online-softmax blocks too.
        for (hd, heads, n_keys) in [
            (24, 3, 17),
            (64, 4, 5),
            (256, 5, 1),
            (32, 1, 9),
            (48, 7, 4),
            (256, 4, 300),
            (64, 2, 200),
            (16, 4, 129),
        ] {
            check_attention(hd, heads, n_keys, &mut rnd);
        }
    }

    /// Against a float64 softmax, with f32 rows and with f16 rows (the reference then uses the
    /// f16-rounded keys and values, so only the kernels' own rounding remains); NaN between the
    /// rows shows any read past a head.
    fn check_attention(hd: usize, heads: usize, n_keys: usize, rnd: &mut impl FnMut() -> f32) {
        // Scores spread over tens of units, as real attention logits are.
        let q: Vec<f32> = (0..heads * hd).map(|_| rnd() * 4.0).collect();
        let mut rows = || -> Vec<Vec<f32>> {
            (0..n_keys)
                .map(|_| (0..hd).map(|_| rnd()).collect())
                .collect()
        };
        let (keys, values) = (rows(), rows());
        let half = |rows: &[Vec<f32>]| -> Vec<Vec<u16>> {
            rows.iter()
                .map(|r| {
                    r.iter()
                        .map(|x| half::f16::from_f32(*x).to_bits())
                        .collect()
                })
                .collect()
        };
        let widen = |rows: &[Vec<u16>]| -> Vec<Vec<f32>> {
            rows.iter()
                .map(|r| {
                    r.iter()
                        .map(|x| half::f16::from_bits(*x).to_f32())
                        .collect()
                })
                .collect()
        };
        let (keys16, values16) = (half(&keys), half(&values));
        let scale = 0.3f32;
        for isa in Isa::available() {
            let c = Compute::new(isa, 1);
            for f16 in [false, true] {
                let mut out = vec![0f32; heads * hd];
                // Rows `stride` apart in blocks of four slots, as the cache lays them out; the
                // blocks in reverse order with a spare block between, the keys starting one
                // slot into the first block, and NaN everywhere else, so a read of the wrong
                // slot or past a head shows.
                let (stride, block_len, first) = (hd + 3, 4, 1);
                let n_blocks = (first + n_keys).div_ceil(block_len);
                let blocks: Vec<u32> = (0..n_blocks).map(|b| (2 * (n_blocks - b)) as u32).collect();
                let slots = (2 * n_blocks + 1) * block_len;
                let mut k32 = vec![f32::NAN; slots * stride];
                let mut v32 = k32.clone();
                let mut k16 = vec![0x7E00u16; slots * stride];
                let mut v16 = k16.clone();
                for j in 0..n_keys {
                    let p = first + j;
                    let at = (blocks[p / block_len] as usize * block_len + p % block_len) * stride;
                    k32[at..at + hd].copy_from_slice(&keys[j]);
                    v32[at..at + hd].copy_from_slice(&values[j]);
                    k16[at..at + hd].copy_from_slice(&keys16[j]);
                    v16[at..at + hd].copy_from_slice(&values16[j]);
                }
                let kv = KvBlocks {
                    rows: if f16 {
                        KvRow::F16(&k16, &v16)
                    } else {
                        KvRow::F32(&k32, &v32)
                    },
                    stride,
                    block_len,
                    blocks: &blocks,
                    first,
                    n: n_keys,
                };
                c.attend_heads(&q, hd, &kv, scale, &mut Vec::new(), &mut out);
                let (k_ref, v_ref) = if f16 {
                    (widen(&keys16), widen(&values16))
                } else {
                    (keys.clone(), values.clone())
                };
                for r in 0..heads {
                    let s: Vec<f64> = k_ref
                        .iter()
                        .map(|k| {
                            (0..hd)
                                .map(|i| q[r * hd + i] as f64 * k[i] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for i in 0..hd {
                        let want: f64 = (0..n_keys)
                            .map(|j| (s[j] - max).exp() / z * v_ref[j][i] as f64)
                            .sum();
                        let got = out[r * hd + i] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{isa} f16 {f16} hd {hd} heads {heads} keys {n_keys}: head {r} \
                             dim {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
