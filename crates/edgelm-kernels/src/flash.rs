//! Attention of a block of consecutive query tokens over one kv head's cached keys (prefill,
//! and chunked prefill at depth), as flash attention computes it. Per-token attention reads and
//! widens every key once per token; here each block of [`KEYS`] keys and values is widened to
//! f32 once and used by every query row of the block — its tokens times the query heads that
//! share the kv head — so the work at depth is two small matrix products per key block, not
//! cache reads:
//!
//! - scores `Sᵀ = K · Qᵀ` (keys by query rows; the queries transposed and scaled once),
//! - causal and window masks where a key block crosses a token's span,
//! - the online softmax down each column (every query row's running maximum and sum, as
//!   vectors across rows),
//! - `Oᵀ += Vᵀ · P` (head dimensions by query rows), rescaled when a maximum grows.
//!
//! Query rows are padded to the vector width; the padding's scores and outputs are computed
//! and dropped.

use crate::attention::{check_view, f16, kind, levels, Kind, KvBlocks, KvPlane};
use crate::{Compute, Isa};

/// Consecutive query tokens of one sequence and the query heads of one kv head.
#[derive(Clone, Copy, Debug)]
pub struct QueryBlock<'a> {
    /// Token `t`'s `heads` query heads (`hd` values each, adjacent) start at `t · stride`.
    pub q: &'a [f32],
    pub stride: usize,
    pub heads: usize,
    /// The key positions each token attends to: `spans[t].0 .. spans[t].1`, inside the
    /// view's keys (causal and window limits).
    pub spans: &'a [(usize, usize)],
}

/// Keys per block: scores, widened keys and values stay in L1/L2 between the products.
const KEYS: usize = 64;

/// The score of a key a query may not see; its weight is exactly 0. Finite, so a row that has
/// seen no key yet stays NaN-free (its maximum stays here, its rescale factor e⁰).
const MASKED: f32 = -1e30;

impl Compute {
    /// `out` (laid out as `block.q`) = softmax attention of every query row of `block` over
    /// its tokens' spans of `kv`'s keys; equal to [`Compute::attend_heads`] per token up to
    /// rounding.
    ///
    /// Panics if a span lies outside `kv`'s keys or `out` is shorter than the queries (the
    /// caller's bug), or for the reasons `attend_heads` does.
    pub fn attend_block(
        &self,
        block: &QueryBlock<'_>,
        hd: usize,
        kv: &KvBlocks<'_>,
        scale: f32,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let tokens = block.spans.len();
        if tokens == 0 || hd == 0 {
            return;
        }
        let span_end = (tokens - 1) * block.stride + block.heads * hd;
        assert!(
            block.q.len() >= span_end && out.len() >= span_end,
            "block attention: queries or output shorter than {tokens} tokens"
        );
        for &(lo, hi) in block.spans {
            assert!(
                kv.first <= lo && lo < hi && hi <= kv.first + kv.n,
                "block attention: span {lo}..{hi} outside keys {}..{}",
                kv.first,
                kv.first + kv.n
            );
        }
        check_view(kv, hd);
        match self.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => attend::<Avx512>(block, hd, kv, scale, scratch, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::AvxVnni => attend::<Avx2>(block, hd, kv, scale, scratch, out),
            _ => attend::<Scalar>(block, hd, kv, scale, scratch, out),
        }
    }
}

/// The products, softmax and widening of one instruction set.
trait Ops {
    /// Query rows are padded to a multiple of this.
    const LANES: usize;
    /// `c[i·ldc + j] += Σ_p a[i·ars + p·acs] · b[p·ldb + j]`, `i < m`, `j < n`, `p < k`; `n` a
    /// multiple of `LANES`.
    ///
    /// # Safety
    /// Every index above is inside the buffers the pointers come from.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        mnk: (usize, usize, usize),
        a: *const f32,
        a_strides: (usize, usize),
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    );
    /// See [`softmax_scalar`].
    fn softmax(s: &mut [f32], rp: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) -> bool;
    /// Every `rp`-wide row of `o` times `alpha` column-wise.
    fn rescale(o: &mut [f32], rp: usize, alpha: &[f32]);
    /// `dst` = the cached row at `src` (of `kind`) as f32.
    ///
    /// # Safety
    /// `src` points at a row of `dst.len()` values of `kind` inside its plane.
    unsafe fn widen(kind: Kind, src: *const u8, dst: &mut [f32]);
}

struct Scalar;
impl Ops for Scalar {
    const LANES: usize = 8;
    unsafe fn gemm(
        (m, n, k): (usize, usize, usize),
        a: *const f32,
        (ars, acs): (usize, usize),
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        for i in 0..m {
            for p in 0..k {
                let av = *a.add(i * ars + p * acs);
                for j in 0..n {
                    *c.add(i * ldc + j) += av * *b.add(p * ldb + j);
                }
            }
        }
    }
    fn softmax(s: &mut [f32], rp: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) -> bool {
        softmax_scalar(s, rp, m, l, alpha)
    }
    fn rescale(o: &mut [f32], rp: usize, alpha: &[f32]) {
        for row in o.chunks_exact_mut(rp) {
            row.iter_mut().zip(alpha).for_each(|(x, a)| *x *= a);
        }
    }
    unsafe fn widen(kind: Kind, src: *const u8, dst: &mut [f32]) {
        match kind {
            Kind::F32 => {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = src.cast::<f32>().add(i).read_unaligned();
                }
            }
            Kind::F16 => {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = f16(src.cast::<u16>().add(i).read_unaligned());
                }
            }
            Kind::Q8_0 => widen_blocks(&*src.cast::<crate::BlockQ8_0>(), dst),
            Kind::Q4_0 => widen_blocks(&*src.cast::<crate::BlockQ4_0>(), dst),
        }
    }
}

/// Scalar dequantization of the blocks starting at `first` into `dst`.
///
/// # Safety
/// `dst.len() / 32` blocks follow `first` in its plane.
unsafe fn widen_blocks<B: crate::attention::QuantBlock>(first: &B, dst: &mut [f32]) {
    let first: *const B = first;
    for (i, out) in dst.chunks_exact_mut(crate::KV_BLOCK).enumerate() {
        let (d, l) = levels(&*first.add(i));
        out.iter_mut().zip(l).for_each(|(o, l)| *o = l as f32 * d);
    }
}

/// One key block of the online softmax, down each column of `s` (rows of `rp` scores, one row
/// per key): the columns' maxima grow to cover the block (`alpha` = e^(old − new), the factor
/// earlier sums and outputs are rescaled by), the scores become e^(score − maximum) — masked
/// ones exactly 0, so they change no sum — and `l` the rescaled sums plus this block's.
/// Returns whether any factor differs from 1.
fn softmax_scalar(
    s: &mut [f32],
    rp: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) -> bool {
    let mut changed = false;
    for c in 0..rp {
        let max = s.iter().skip(c).step_by(rp).copied().fold(m[c], f32::max);
        alpha[c] = (m[c] - max).exp();
        changed |= alpha[c] != 1.0;
        let mut sum = 0.0;
        for x in s.iter_mut().skip(c).step_by(rp) {
            *x = if *x == MASKED { 0.0 } else { (*x - max).exp() };
            sum += *x;
        }
        l[c] = l[c] * alpha[c] + sum;
        m[c] = max;
    }
    changed
}

/// AVX2 + FMA + F16C (the AVX-512 path's softmax and widening too).
#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl Ops for Avx2 {
    const LANES: usize = 8;
    unsafe fn gemm(
        mnk: (usize, usize, usize),
        a: *const f32,
        st: (usize, usize),
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: `Isa::Avx2` and `Avx512` are only chosen on CPUs with AVX2 and FMA.
        crate::x86::flash::gemm8(mnk, a, st, b, ldb, c, ldc)
    }
    fn softmax(s: &mut [f32], rp: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) -> bool {
        // SAFETY: as above; `rp` is a multiple of 8 and the buffers hold `rp` columns.
        unsafe { crate::x86::flash::softmax(MASKED, s, rp, m, l, alpha) }
    }
    fn rescale(o: &mut [f32], rp: usize, alpha: &[f32]) {
        // SAFETY: as above.
        unsafe { crate::x86::flash::rescale(o, rp, alpha) }
    }
    unsafe fn widen(kind: Kind, src: *const u8, dst: &mut [f32]) {
        use crate::x86::flash::{widen_blocks, widen_f16};
        match kind {
            Kind::F32 => Scalar::widen(kind, src, dst),
            Kind::F16 => widen_f16(src.cast(), dst),
            Kind::Q8_0 => widen_blocks(src.cast::<crate::BlockQ8_0>(), dst),
            Kind::Q4_0 => widen_blocks(src.cast::<crate::BlockQ4_0>(), dst),
        }
    }
}

/// 512-bit products; the rest as [`Avx2`].
#[cfg(target_arch = "x86_64")]
struct Avx512;
#[cfg(target_arch = "x86_64")]
impl Ops for Avx512 {
    const LANES: usize = 16;
    unsafe fn gemm(
        mnk: (usize, usize, usize),
        a: *const f32,
        st: (usize, usize),
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: `Isa::Avx512` is only chosen on CPUs with AVX-512 F.
        crate::x86::flash::gemm16(mnk, a, st, b, ldb, c, ldc)
    }
    fn softmax(s: &mut [f32], rp: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) -> bool {
        Avx2::softmax(s, rp, m, l, alpha)
    }
    fn rescale(o: &mut [f32], rp: usize, alpha: &[f32]) {
        Avx2::rescale(o, rp, alpha)
    }
    unsafe fn widen(kind: Kind, src: *const u8, dst: &mut [f32]) {
        Avx2::widen(kind, src, dst)
    }
}

/// Row addresses of one plane of a [`KvBlocks`] (checked by `check_view`).
struct Plane<'a> {
    base: *const u8,
    kind: Kind,
    slot_bytes: usize,
    blocks: &'a [u32],
    shift: u32,
}

impl<'a> Plane<'a> {
    fn new(plane: KvPlane<'a>, kv: &KvBlocks<'a>) -> Plane<'a> {
        let (base, bytes_per_32): (*const u8, usize) = match plane {
            KvPlane::F32(x) => (x.as_ptr().cast(), 128),
            KvPlane::F16(x) => (x.as_ptr().cast(), 64),
            KvPlane::Q8_0(x) => (x.as_ptr().cast(), 34),
            KvPlane::Q4_0(x) => (x.as_ptr().cast(), 18),
        };
        let kind = kind(&plane);
        let slot_bytes = match kind {
            Kind::F32 | Kind::F16 => kv.stride * bytes_per_32 / 32,
            Kind::Q8_0 | Kind::Q4_0 => kv.stride / crate::KV_BLOCK * bytes_per_32,
        };
        Plane {
            base,
            kind,
            slot_bytes,
            blocks: kv.blocks,
            shift: kv.block_len.trailing_zeros(),
        }
    }

    /// The row of position `p`.
    fn row(&self, p: usize) -> *const u8 {
        let mask = (1usize << self.shift) - 1;
        let slot = ((self.blocks[p >> self.shift] as usize) << self.shift) | (p & mask);
        self.base.wrapping_add(slot * self.slot_bytes)
    }
}

fn attend<O: Ops>(
    block: &QueryBlock<'_>,
    hd: usize,
    kv: &KvBlocks<'_>,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (heads, stride, spans) = (block.heads, block.stride, block.spans);
    let rp = (spans.len() * heads).next_multiple_of(O::LANES);
    scratch.clear();
    scratch.resize(2 * hd * rp + KEYS * rp + 2 * KEYS * hd + 3 * rp, 0.0);
    let (qt, rest) = scratch.split_at_mut(hd * rp);
    let (ot, rest) = rest.split_at_mut(hd * rp);
    let (s, rest) = rest.split_at_mut(KEYS * rp);
    let (kf, rest) = rest.split_at_mut(KEYS * hd);
    let (vf, rest) = rest.split_at_mut(KEYS * hd);
    let (m, rest) = rest.split_at_mut(rp);
    let (l, alpha) = rest.split_at_mut(rp);
    // Query row r = t·heads + g, transposed (dimension-major) and scaled.
    for t in 0..spans.len() {
        for g in 0..heads {
            let row = &block.q[t * stride + g * hd..][..hd];
            for (d, x) in row.iter().enumerate() {
                qt[d * rp + t * heads + g] = x * scale;
            }
        }
    }
    m.fill(MASKED);
    let (keys, values) = (Plane::new(kv.keys, kv), Plane::new(kv.values, kv));
    let (from, to) = (
        spans.iter().map(|s| s.0).min().unwrap_or(0),
        spans.iter().map(|s| s.1).max().unwrap_or(0),
    );
    // Key blocks inside every token's span need no mask.
    let (seen_from, seen_to) = (
        spans.iter().map(|s| s.0).max().unwrap_or(0),
        spans.iter().map(|s| s.1).min().unwrap_or(0),
    );
    // Key blocks end at multiples of KEYS, so each token's keys fall into the same blocks
    // whichever tokens share its query block: its arithmetic does not depend on them.
    let mut next = from;
    while next < to {
        let j0 = next;
        next = ((j0 / KEYS + 1) * KEYS).min(to);
        let nb = next - j0;
        for (j, dst) in kf.chunks_exact_mut(hd).take(nb).enumerate() {
            // SAFETY: `check_view` put every position of the view inside the planes.
            unsafe { O::widen(keys.kind, keys.row(j0 + j), dst) };
        }
        let s = &mut s[..nb * rp];
        s.fill(0.0);
        // SAFETY: kf holds nb rows of hd, qt hd rows of rp, s nb rows of rp.
        unsafe {
            O::gemm(
                (nb, rp, hd),
                kf.as_ptr(),
                (hd, 1),
                qt.as_ptr(),
                rp,
                s.as_mut_ptr(),
                rp,
            )
        };
        if j0 < seen_from || j0 + nb > seen_to {
            for (j, row) in s.chunks_exact_mut(rp).enumerate() {
                let p = j0 + j;
                for (t, &(lo, hi)) in spans.iter().enumerate() {
                    if p < lo || p >= hi {
                        row[t * heads..(t + 1) * heads].fill(MASKED);
                    }
                }
            }
        }
        if O::softmax(s, rp, m, l, alpha) {
            O::rescale(ot, rp, alpha);
        }
        for (j, dst) in vf.chunks_exact_mut(hd).take(nb).enumerate() {
            // SAFETY: as for the keys.
            unsafe { O::widen(values.kind, values.row(j0 + j), dst) };
        }
        // SAFETY: vf holds nb rows of hd (read transposed), s nb rows of rp, ot hd rows of rp.
        unsafe {
            O::gemm(
                (hd, rp, nb),
                vf.as_ptr(),
                (1, hd),
                s.as_ptr(),
                rp,
                ot.as_mut_ptr(),
                rp,
            )
        };
    }
    for t in 0..spans.len() {
        for g in 0..heads {
            let r = t * heads + g;
            let inv = 1.0 / l[r];
            let row = &mut out[t * stride + g * hd..][..hd];
            for (d, o) in row.iter_mut().enumerate() {
                *o = ot[d * rp + r] * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// Every path's product against the scalar one on random operands, shapes off and on the
    /// tiles, `a` read by rows and by columns.
    #[test]
    fn products_match_the_scalar_reference_on_every_path() {
        let mut rng = Rng(0xf1a5);
        for isa in Isa::available() {
            let lanes = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => 16,
                _ => 8,
            };
            for (m, nv, k) in [(64, 4, 64), (13, 3, 7), (1, 1, 1), (7, 5, 33), (64, 8, 256)] {
                let n = nv * lanes;
                for transposed in [false, true] {
                    let a: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rng.unit()).collect();
                    let c0: Vec<f32> = (0..m * n).map(|_| rng.unit()).collect();
                    let st = if transposed { (1, m) } else { (k, 1) };
                    let (mut want, mut got) = (c0.clone(), c0.clone());
                    let (pa, pb) = (a.as_ptr(), b.as_ptr());
                    // SAFETY: shapes as allocated; each path only on a CPU that runs it.
                    unsafe {
                        Scalar::gemm((m, n, k), pa, st, pb, n, want.as_mut_ptr(), n);
                        let pc = got.as_mut_ptr();
                        match isa {
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx512 => Avx512::gemm((m, n, k), pa, st, pb, n, pc, n),
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx2 | Isa::AvxVnni => Avx2::gemm((m, n, k), pa, st, pb, n, pc, n),
                            _ => Scalar::gemm((m, n, k), pa, st, pb, n, pc, n),
                        }
                    }
                    for (i, (x, y)) in want.iter().zip(&got).enumerate() {
                        assert!(
                            (x - y).abs() < 1e-4 * (k as f32).sqrt(),
                            "{isa} m {m} n {n} k {k} transposed {transposed}: c[{i}] {y} vs {x}"
                        );
                    }
                }
            }
        }
    }

    /// The vector softmax step against the scalar one, masked scores (weighing exactly 0), a
    /// column masked throughout and growing maxima included.
    #[test]
    fn softmax_step_matches_the_scalar_reference() {
        let mut rng = Rng(0x50f7);
        for isa in Isa::available() {
            let (rp, rows) = (32, 9);
            let mut m: Vec<f32> = (0..rp)
                .map(|i| if i % 5 == 0 { MASKED } else { rng.unit() * 8.0 })
                .collect();
            let mut l: Vec<f32> = (0..rp).map(|_| rng.unit().abs() * 3.0).collect();
            let mut s: Vec<f32> = (0..rp * rows)
                .map(|i| {
                    // Scattered masks, and column 3 masked in every row.
                    if i % 7 == 0 || i % rp == 3 {
                        MASKED
                    } else {
                        rng.unit() * 10.0
                    }
                })
                .collect();
            let masked: Vec<bool> = s.iter().map(|&x| x == MASKED).collect();
            let (mut m2, mut l2, mut s2) = (m.clone(), l.clone(), s.clone());
            let (mut a, mut a2) = (vec![0f32; rp], vec![0f32; rp]);
            let want = softmax_scalar(&mut s, rp, &mut m, &mut l, &mut a);
            let got = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => {
                    Avx2::softmax(&mut s2, rp, &mut m2, &mut l2, &mut a2)
                }
                _ => Scalar::softmax(&mut s2, rp, &mut m2, &mut l2, &mut a2),
            };
            assert_eq!(want, got, "{isa}: whether a maximum grew");
            for (i, _) in masked.iter().enumerate().filter(|m| *m.1) {
                assert!(
                    s[i] == 0.0 && s2[i] == 0.0,
                    "{isa}: masked score {i} weighs {}",
                    s2[i]
                );
            }
            for (name, x, y) in [
                ("weights", &s, &s2),
                ("maxima", &m, &m2),
                ("sums", &l, &l2),
                ("factors", &a, &a2),
            ] {
                for (i, (x, y)) in x.iter().zip(y.iter()).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                        "{isa} {name}[{i}]: {y} vs {x}"
                    );
                }
            }
        }
    }

    /// Block attention against per-token attention (itself checked against float64) for
    /// causal and windowed spans, every type pair and path: head sizes, head counts and token
    /// counts off and on the tiles, keys before the block and none, queries `stride` apart with
    /// other heads between.
    #[test]
    fn block_attention_equals_per_token_attention() {
        use crate::attention::tests::store;
        use Kind::*;
        let mut rng = Rng(0xb10c);
        let cases: [(usize, usize, usize, usize, Option<usize>); 6] = [
            (64, 3, 21, 150, None),
            (32, 7, 9, 0, None),
            (256, 4, 16, 600, Some(512)),
            (64, 2, 5, 40, Some(20)),
            (24, 3, 4, 10, None),
            (64, 1, 2, 0, Some(1)),
        ];
        for (hd, heads, tokens, before, window) in cases {
            for kinds in [
                (F32, F32),
                (F16, F16),
                (Q8_0, Q8_0),
                (Q4_0, Q4_0),
                (Q8_0, F16),
                (F16, Q4_0),
            ] {
                let quantized = kinds != (F32, F32) && kinds != (F16, F16);
                if quantized && hd % crate::KV_BLOCK != 0 {
                    continue;
                }
                let n = before + tokens;
                let mut rows = || -> Vec<Vec<f32>> {
                    (0..n)
                        .map(|_| (0..hd).map(|_| rng.unit()).collect())
                        .collect()
                };
                let (keys, vals) = (rows(), rows());
                // Blocks of 16 slots in reverse order with spares between, as in a cache.
                let stride = hd + if quantized { crate::KV_BLOCK } else { 8 };
                let n_blocks = n.div_ceil(16);
                let blocks: Vec<u32> = (0..n_blocks).map(|b| (2 * (n_blocks - b)) as u32).collect();
                let slots = (2 * n_blocks + 1) * 16;
                let slot = |j: usize| blocks[j / 16] as usize * 16 + j % 16;
                let (kp, _) = store(kinds.0, &keys, slot, slots, stride);
                let (vp, _) = store(kinds.1, &vals, slot, slots, stride);
                let spans: Vec<(usize, usize)> = (0..tokens)
                    .map(|t| {
                        let pos = before + t;
                        (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos + 1)
                    })
                    .collect();
                let view = |first: usize, len: usize| KvBlocks {
                    keys: kp.view(),
                    values: vp.view(),
                    stride,
                    block_len: 16,
                    blocks: &blocks,
                    first,
                    n: len,
                };
                let q_stride = (heads + 2) * hd;
                let q: Vec<f32> = (0..tokens * q_stride).map(|_| rng.unit() * 4.0).collect();
                let block = QueryBlock {
                    q: &q[hd..],
                    stride: q_stride,
                    heads,
                    spans: &spans,
                };
                let first = spans[0].0;
                for isa in Isa::available() {
                    let c = Compute::precise(isa, 1);
                    let mut got = vec![f32::NAN; tokens * q_stride];
                    let whole = view(first, n - first);
                    c.attend_block(&block, hd, &whole, 0.3, &mut Vec::new(), &mut got[hd..]);
                    for (t, &(lo, hi)) in spans.iter().enumerate() {
                        let qt = &q[t * q_stride + hd..][..heads * hd];
                        let mut want = vec![0f32; heads * hd];
                        c.attend_heads(qt, hd, &view(lo, hi - lo), 0.3, &mut Vec::new(), &mut want);
                        let got = &got[t * q_stride + hd..][..heads * hd];
                        for (i, (x, y)) in want.iter().zip(got).enumerate() {
                            assert!(
                                (x - y).abs() < 2e-5,
                                "{isa} {kinds:?} hd {hd} heads {heads} window {window:?}: \
                                 token {t} value {i}: {y} vs {x}"
                            );
                        }
                    }
                }
            }
        }
    }
}
