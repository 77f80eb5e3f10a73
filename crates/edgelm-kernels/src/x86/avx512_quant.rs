//! AVX-512 (VNNI) kernels of the fast path. Types without one here use their AVX2 kernel.

use crate::qdot::QuantKernel;
use edgelm_quant::GgmlType;

/// The AVX-512 kernel for a weight type, where one exists.
pub fn kernel(_ty: GgmlType) -> Option<QuantKernel> {
    None
}
