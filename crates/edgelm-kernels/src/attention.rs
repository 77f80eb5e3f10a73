//! Softmax attention of the query heads that share one key/value head (grouped-query
//! attention): each key and value row is fetched once and used by every head of the group.

use crate::{Compute, Isa};

/// Vector primitives of one ISA, resolved statically inside the attention loops.
trait VecOps {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    fn axpy(a: f32, x: &[f32], y: &mut [f32]);
}

struct Scalar;
impl VecOps for Scalar {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        crate::compute::scalar_dot(a, b)
    }
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        x.iter().zip(y.iter_mut()).for_each(|(x, y)| *y += a * x);
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl VecOps for Avx2 {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only instantiated when `Isa` is Avx2 or Avx512, which imply AVX2 and FMA.
        unsafe { crate::x86::avx2::dot(a, b) }
    }
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        // SAFETY: as above.
        unsafe { crate::x86::avx2::axpy(a, x, y) }
    }
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
    for j in 0..n_keys {
        let k = kv(j).0;
        for (r, qr) in q.chunks_exact(hd).enumerate() {
            scores[r * n_keys + j] = V::dot(qr, k) * scale;
        }
    }
    for row in scores.chunks_exact_mut(n_keys.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        row.iter_mut().for_each(|s| *s /= sum);
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for j in 0..n_keys {
        let v = kv(j).1;
        for (r, o) in out.chunks_exact_mut(hd).enumerate() {
            V::axpy(scores[r * n_keys + j], v, o);
        }
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
        let (hd, heads, n_keys) = (24, 3, 17);
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
                        "{isa}: head {r} dim {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
