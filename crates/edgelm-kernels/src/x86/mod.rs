pub mod avx2;
mod avx2_kquants;
mod avx2_legacy;
pub mod avx2_quant;
pub mod avx512_quant;
