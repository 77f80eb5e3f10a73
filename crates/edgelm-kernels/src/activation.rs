//! Gated activations of the feed-forward block: `gate ← act(gate) · up`, both written as
//! `x · up / (1 + e^(−y))` so each costs one exp and no cancellation for negative inputs.

use crate::{Compute, Isa};

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: silu(gate) · up.
    Silu,
    /// GeGLU with the tanh approximation of GELU: 0.5·(1 + tanh(z)) = 1 / (1 + e^(−2z)).
    GeluTanh,
}

/// 2·√(2/π), the tanh-GELU's scale doubled (its `e^(−2z)` form).
pub(crate) const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_2;
/// The tanh-GELU's cubic coefficient.
pub(crate) const GELU_CUBIC: f32 = 0.044715;

impl Compute {
    /// `gate ← act(gate) · up` element-wise over the shorter length.
    pub fn glu(&self, act: Activation, gate: &mut [f32], up: &[f32]) {
        match self.isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2`/`Avx512` are only chosen when the CPU has AVX2 and FMA.
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => unsafe {
                crate::x86::avx2::glu(act, gate, up)
            },
            _ => glu_scalar(act, gate, up),
        }
    }
}

/// The scalar reference of [`Compute::glu`].
pub(crate) fn glu_scalar(act: Activation, gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = match act {
            Activation::Silu => x,
            Activation::GeluTanh => TWO_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x),
        };
        *g = x / (1.0 + (-y).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// Every ISA against the scalar reference over inputs from −40 to 40 (both tails of the
    /// sigmoid), lengths off the eight-lane step: within 1e-5 relative + 1e-30 (in the far
    /// negative tail e^(−y) turns the last-bit rounding of y, ~2e-6 of 20, into as much relative
    /// error of the result).
    #[test]
    fn glu_matches_scalar_on_every_isa() {
        let mut rng = Rng(0x61_75);
        for act in [Activation::Silu, Activation::GeluTanh] {
            for len in [1usize, 7, 8, 9, 100] {
                let gate: Vec<f32> = (0..len).map(|_| rng.unit() * 40.0).collect();
                let up: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
                let mut want = gate.clone();
                glu_scalar(act, &mut want, &up);
                for isa in Isa::available() {
                    let mut got = gate.clone();
                    Compute::precise(isa, 1).glu(act, &mut got, &up);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs() + 1e-30,
                            "{isa} {act:?}: glu({}, {}) = {g}, want {w}",
                            gate[i],
                            up[i]
                        );
                    }
                }
            }
        }
    }
}
