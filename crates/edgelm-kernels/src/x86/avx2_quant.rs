//! AVX2 kernels of the fast path: row dots of quantized weights with 8-bit activations, and the
//! activation quantizers. Legacy 32-element formats live in `avx2_legacy`, k-quants in
//! `avx2_kquants`; each kernel is tested against the scalar reference in `edgelm_quant`. The
//! AVX-VNNI tier is AVX2's table with `vpdpbusd` in the legacy formats' interleaved kernels and
//! the k-quants' prompt panels.

use crate::qdot::QuantKernel;
use edgelm_quant::GgmlType;

/// The AVX2 kernel for a weight type, where one exists.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    super::avx2_legacy::kernel(ty).or_else(|| super::avx2_kquants::kernel(ty))
}

/// The AVX-VNNI kernel for a weight type, where one exists: AVX2's, with the interleaved row
/// dot and prompt path of the legacy formats and the k-quants' prompt path on `vpdpbusd`.
pub fn vnni_kernel(ty: GgmlType) -> Option<QuantKernel> {
    use super::avx2_interleaved::{prefill_for, row_dot_for, P_VNNI};
    let k = kernel(ty)?;
    Some(match row_dot_for::<P_VNNI>(ty) {
        Some(interleaved) => QuantKernel {
            isa: crate::Isa::AvxVnni,
            interleaved: Some(interleaved),
            prefill: prefill_for::<P_VNNI>(ty),
            ..k
        },
        None => match super::avx2_kpanels::prefill_for::<P_VNNI>(ty) {
            Some(prefill) => QuantKernel {
                isa: crate::Isa::AvxVnni,
                prefill: Some(prefill),
                ..k
            },
            None => k,
        },
    })
}
