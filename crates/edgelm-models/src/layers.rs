//! Shared layer math in f32: norms, rotary embeddings (activations and attention run as
//! `edgelm_kernels::Compute` kernels).

pub use edgelm_kernels::Activation;

/// `x ← x / rms(x) · w` over each row of `w.len()` values.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        // Eight running sums (one vector register) instead of one serial chain.
        let mut lanes = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            lanes.iter_mut().zip(c).for_each(|(s, v)| *s += v * v);
        }
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        let ss = (lanes.iter().sum::<f32>() + tail) / w.len() as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * scale * w);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs (2i, 2i+1): Llama.
    Normal,
    /// Rotate pairs (i, i + n_rot/2): GPT-NeoX, Qwen2, Gemma.
    Neox,
}

/// Rotary position embedding for one layer: inverse frequencies precomputed in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    pub n_rot: usize,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// `freq_scale` is 1/linear-scaling-factor; `factors` divide each frequency (Llama 3).
    pub fn new(
        style: RopeStyle,
        n_rot: usize,
        base: f64,
        freq_scale: f64,
        factors: Option<&[f32]>,
    ) -> Rope {
        let inv_freq = (0..n_rot / 2)
            .map(|i| {
                let f = base.powf(-2.0 * i as f64 / n_rot as f64) * freq_scale;
                f / factors.and_then(|ff| ff.get(i)).map_or(1.0, |&d| d as f64)
            })
            .collect();
        Rope {
            style,
            n_rot,
            inv_freq,
        }
    }

    /// `sin θ_i` then `cos θ_i` (`n_rot / 2` each) for position `pos` into `out` (`n_rot`
    /// values), computed in f64: a table that every head and every layer with this rotation
    /// can share.
    pub fn sin_cos(&self, pos: usize, out: &mut [f32]) {
        let (sin, cos) = out.split_at_mut(self.n_rot / 2);
        for ((f, s), c) in self.inv_freq.iter().zip(sin).zip(cos) {
            let theta = pos as f64 * f;
            *s = theta.sin() as f32;
            *c = theta.cos() as f32;
        }
    }

    /// Rotate every head (`head_dim` values each) of one token's vector by the
    /// [`Rope::sin_cos`] table of its position.
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, sin_cos: &[f32]) {
        let half = self.n_rot / 2;
        let (sin, cos) = sin_cos.split_at(half);
        for head in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Normal => {
                    for ((pair, s), c) in head[..self.n_rot].chunks_exact_mut(2).zip(sin).zip(cos) {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * c - x1 * s;
                        pair[1] = x0 * s + x1 * c;
                    }
                }
                RopeStyle::Neox => {
                    // Contiguous halves: the loop vectorizes.
                    let (lo, hi) = head[..self.n_rot].split_at_mut(half);
                    for (((a, b), s), c) in lo.iter_mut().zip(hi.iter_mut()).zip(sin).zip(cos) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm(&mut x, &[1.0, 1.0, 2.0, 1.0], 0.0);
        let want = 3.0 / (25.0f32 / 4.0).sqrt();
        assert!((x[0] - want).abs() < 1e-6);
    }

    fn apply(r: &Rope, x: &mut [f32], head_dim: usize, pos: usize) {
        let mut sin_cos = vec![0f32; r.n_rot];
        r.sin_cos(pos, &mut sin_cos);
        r.rotate(x, head_dim, &sin_cos);
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs() {
        // One frequency (n_rot 2): pos 1 rotates by 1 radian.
        let r = Rope::new(RopeStyle::Normal, 2, 10000.0, 1.0, None);
        let mut x = vec![1.0, 0.0];
        apply(&r, &mut x, 2, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let r = Rope::new(RopeStyle::Neox, 4, 10000.0, 1.0, None);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        apply(&r, &mut x, 4, 1);
        // Pair (0, 2) at frequency 1.
        assert!(
            (x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6 && x[1] == 0.0
        );
    }
}
