//! Softmax attention of the query heads that share one key/value head (grouped-query
//! attention): each key and value row is fetched once and used by every head of the group.

use crate::{Compute, Isa};

/// Register-tiled primitives of one ISA, resolved statically inside the attention loops.
trait VecOps {
    /// `out[r][t] = k[r] · q[t]` over `hd` values, `R ≤ 4` keys by `T ≤ 3` query rows.
    fn dots<const R: usize, const T: usize>(
        k: &[*const f32; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    );
    /// `out[r] += Σ_j p[r][j] · v[j]` over rows of `hd` values.
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const f32],
        hd: usize,
        out: &[*mut f32; R],
    );
}

struct Scalar;
impl VecOps for Scalar {
    fn dots<const R: usize, const T: usize>(
        k: &[*const f32; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        for r in 0..R {
            for t in 0..T {
                // SAFETY: the caller passes rows of `hd` floats.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(k[r], hd),
                        std::slice::from_raw_parts(q[t], hd),
                    )
                };
                out[r][t] = crate::compute::scalar_dot(a, b);
            }
        }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const f32],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        for r in 0..R {
            // SAFETY: the caller passes `v.len()` weights per row and rows of `hd` floats.
            let (w, o) = unsafe {
                (
                    std::slice::from_raw_parts(p[r], v.len()),
                    std::slice::from_raw_parts_mut(out[r], hd),
                )
            };
            for (wj, vj) in w.iter().zip(v) {
                // SAFETY: as above.
                let vj = unsafe { std::slice::from_raw_parts(*vj, hd) };
                o.iter_mut().zip(vj).for_each(|(o, v)| *o += wj * v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl VecOps for Avx2 {
    fn dots<const R: usize, const T: usize>(
        k: &[*const f32; R],
        q: &[*const f32; T],
        hd: usize,
        out: &mut [[f32; T]; R],
    ) {
        // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2 and FMA;
        // rows hold `hd` floats.
        unsafe { crate::x86::avx2::tile::<R, T>(k, q, hd, out) }
    }
    fn weighted_rows<const R: usize>(
        p: &[*const f32; R],
        v: &[*const f32],
        hd: usize,
        out: &[*mut f32; R],
    ) {
        if !hd.is_multiple_of(16) {
            return Scalar::weighted_rows(p, v, hd, out);
        }
        // SAFETY: as above; `hd` is a multiple of 16.
        unsafe { crate::x86::avx2::weighted_rows::<R>(p, v, hd, out) }
    }
}

thread_local! {
    /// Value-row pointers of the current attention call.
    static VALUES: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Compute {
    /// `out[r] = Σ_j softmax_j(scale · q[r]·k_j) · v_j` for each query head `r` (rows of `hd`
    /// values in `q` and `out`), over keys `j < n_keys`; `kv(j)` returns key and value `j`.
    /// `scores` is caller-owned scratch so the hot path allocates nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_heads<'a>(
        &self,
        q: &[f32],
        hd: usize,
        n_keys: usize,
        kv: &dyn Fn(usize) -> (&'a [f32], &'a [f32]),
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        match self.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => attend::<Avx2>(q, hd, n_keys, kv, scale, scores, out),
            _ => attend::<Scalar>(q, hd, n_keys, kv, scale, scores, out),
        }
    }
}

fn attend<'a, V: VecOps>(
    q: &[f32],
    hd: usize,
    n_keys: usize,
    kv: &dyn Fn(usize) -> (&'a [f32], &'a [f32]),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let heads = q.len() / hd;
    scores.clear();
    scores.resize(heads * n_keys, 0.0);
    out.iter_mut().for_each(|o| *o = 0.0);
    if n_keys == 0 {
        return;
    }
    VALUES.with_borrow_mut(|values| {
        values.clear();
        // Scores four keys by up to three heads at a time: each key row is loaded once per
        // three heads, each head once per four keys.
        let mut j0 = 0;
        while j0 < n_keys {
            let nk = (n_keys - j0).min(4);
            let mut keys = [std::ptr::null::<f32>(); 4];
            for (i, k) in keys[..nk].iter_mut().enumerate() {
                let (kj, vj) = kv(j0 + i);
                *k = kj.as_ptr();
                values.push(vj.as_ptr() as usize);
            }
            let mut r0 = 0;
            while r0 < heads {
                let nr = (heads - r0).min(3);
                let rows: [*const f32; 3] =
                    std::array::from_fn(|t| q[(r0 + t.min(nr - 1)) * hd..].as_ptr());
                let mut put = |r: usize, t: usize, v: f32| {
                    scores[(r0 + t) * n_keys + j0 + r] = v * scale;
                };
                key_tile::<V>(&keys, nk, &rows, nr, hd, &mut put);
                r0 += nr;
            }
            j0 += nk;
        }
        for row in scores.chunks_exact_mut(n_keys) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            row.iter_mut().for_each(|s| *s /= sum);
        }
        let vptrs: &[*const f32] =
            // SAFETY: `usize` and `*const f32` have the same size and alignment; the addresses
            // came from live value rows.
            unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) };
        let mut r0 = 0;
        while r0 < heads {
            let nr = (heads - r0).min(4);
            let p = |r: usize| scores[(r0 + r.min(nr - 1)) * n_keys..].as_ptr();
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
    });
}

/// One tile of scores: `nk ≤ 4` keys by `nr ≤ 3` query rows, reported through `put(key, row, v)`.
fn key_tile<V: VecOps>(
    keys: &[*const f32; 4],
    nk: usize,
    rows: &[*const f32; 3],
    nr: usize,
    hd: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    fn go<V: VecOps, const R: usize, const T: usize>(
        keys: &[*const f32; 4],
        rows: &[*const f32; 3],
        hd: usize,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        let k: [*const f32; R] = std::array::from_fn(|i| keys[i]);
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
        (4, 3) => go::<V, 4, 3>(keys, rows, hd, put),
        (4, 2) => go::<V, 4, 2>(keys, rows, hd, put),
        (4, 1) => go::<V, 4, 1>(keys, rows, hd, put),
        (3, 3) => go::<V, 3, 3>(keys, rows, hd, put),
        (3, 2) => go::<V, 3, 2>(keys, rows, hd, put),
        (3, 1) => go::<V, 3, 1>(keys, rows, hd, put),
        (2, 3) => go::<V, 2, 3>(keys, rows, hd, put),
        (2, 2) => go::<V, 2, 2>(keys, rows, hd, put),
        (2, 1) => go::<V, 2, 1>(keys, rows, hd, put),
        (1, 3) => go::<V, 1, 3>(keys, rows, hd, put),
        (1, 2) => go::<V, 1, 2>(keys, rows, hd, put),
        _ => go::<V, 1, 1>(keys, rows, hd, put),
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
        for (hd, heads, n_keys) in [(24, 3, 17), (64, 4, 5), (256, 5, 1), (32, 1, 9), (48, 7, 4)] {
            check_attention(hd, heads, n_keys, &mut rnd);
        }
    }

    fn check_attention(hd: usize, heads: usize, n_keys: usize, rnd: &mut impl FnMut() -> f32) {
        let q: Vec<f32> = (0..heads * hd).map(|_| rnd()).collect();
        let keys: Vec<Vec<f32>> = (0..n_keys)
            .map(|_| (0..hd).map(|_| rnd()).collect())
            .collect();
        let values: Vec<Vec<f32>> = (0..n_keys)
            .map(|_| (0..hd).map(|_| rnd()).collect())
            .collect();
        let scale = 0.3f32;
        for isa in Isa::available() {
            let c = Compute::new(isa, 1);
            let mut out = vec![0f32; heads * hd];
            let kv = |j: usize| (keys[j].as_slice(), values[j].as_slice());
            c.attend_heads(&q, hd, n_keys, &kv, scale, &mut Vec::new(), &mut out);
            for r in 0..heads {
                let s: Vec<f64> = keys
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
                        .map(|j| (s[j] - max).exp() / z * values[j][i] as f64)
                        .sum();
                    let got = out[r * hd + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{isa} hd {hd} heads {heads} keys {n_keys}: head {r} dim {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
