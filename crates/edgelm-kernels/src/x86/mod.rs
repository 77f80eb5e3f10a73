pub mod avx2;
mod avx2_interleaved;
mod avx2_kquants;
mod avx2_legacy;
pub mod avx2_quant;
pub mod avx512_attention;
pub mod avx512_interleaved;
pub mod avx512_quant;

/// The little-endian f32 at `p`.
///
/// # Safety
/// `p` is valid for 4 bytes.
#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    f32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned())
}

/// The little-endian u32 at `p`.
///
/// # Safety
/// `p` is valid for 4 bytes.
#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    u32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned())
}
