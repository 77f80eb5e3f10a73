//! AVX2 kernels of the fast path: row dots of quantized weights with 8-bit activations, and the
//! activation quantizers. Legacy 32-element formats live in `avx2_legacy`, k-quants in
//! `avx2_kquants`; each kernel is tested against the scalar reference in `edgelm_quant`.

use crate::qdot::QuantKernel;
use edgelm_quant::GgmlType;

/// The AVX2 kernel for a weight type, where one exists.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    super::avx2_legacy::kernel(ty).or_else(|| super::avx2_kquants::kernel(ty))
}
