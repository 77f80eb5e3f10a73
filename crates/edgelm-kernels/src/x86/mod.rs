pub mod avx2;
mod avx2_interleaved;
mod avx2_kpanels;
mod avx2_kquants;
pub mod avx2_kv;
mod avx2_legacy;
pub mod avx2_quant;
pub mod avx512_attention;
pub mod avx512_float;
pub mod avx512_interleaved;
pub mod avx512_quant;
pub mod flash;

/// Weight formats as const-generic tags, shared by every quantized kernel family.
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q5_1: u8 = 3;
const T_Q8_0: u8 = 4;
const T_Q2_K: u8 = 5;
const T_Q3_K: u8 = 6;
const T_Q4_K: u8 = 7;
const T_Q5_K: u8 = 8;
const T_Q6_K: u8 = 9;
const T_IQ4_NL: u8 = 10;
const T_IQ4_XS: u8 = 11;

/// The GGUF type a kernel tag stands for (the tags are this module's constants: any other is a
/// bug, not input).
const fn weight_type(t: u8) -> edgelm_quant::GgmlType {
    use edgelm_quant::GgmlType::*;
    match t {
        T_Q4_0 => Q4_0,
        T_Q4_1 => Q4_1,
        T_Q5_0 => Q5_0,
        T_Q5_1 => Q5_1,
        T_Q8_0 => Q8_0,
        T_Q2_K => Q2_K,
        T_Q3_K => Q3_K,
        T_Q4_K => Q4_K,
        T_Q5_K => Q5_K,
        T_IQ4_NL => IQ4_NL,
        T_IQ4_XS => IQ4_XS,
        T_Q6_K => Q6_K,
        _ => panic!("a kernel type tag without a weight type"),
    }
}

/// The sum of the eight lanes of `v`.
///
/// # Safety
/// The CPU has AVX (inlined only into AVX2 kernels).
#[inline(always)]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The sum of the eight i32 lanes of `v` (wrapping, as the lanes' own additions).
///
/// # Safety
/// The CPU has AVX2 (inlined only into AVX2 kernels).
#[inline(always)]
unsafe fn hsum_i32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

/// Tokens per pass over eight rows of a panel: their accumulators and the current image fill the
/// sixteen 256-bit registers.
const TOKENS: usize = 4;

/// An AVX2 kernel over eight rows of a 16-row panel — `half` 0 or 1 of the `nb` blocks at
/// `panel` — against the first N tokens of `a` (N fixed per kernel, 1..=[`TOKENS`]), writing row
/// `r` of token `j` to `out.ptr[j·ld + r]`.
type HalfKernel = unsafe fn(
    panel: *const u8,
    nb: usize,
    half: usize,
    a: &[*const u8; TOKENS],
    out: crate::qdot::Out,
);

/// The [`HalfKernel`]s of a kernel generic over its type tag and token count, for
/// [`panel_times_tokens`]: `half_kernels!(kernel, T)`.
macro_rules! half_kernels {
    ($kernel:ident, $t:ident) => {
        [
            $kernel::<$t, 1> as HalfKernel,
            $kernel::<$t, 2>,
            $kernel::<$t, 3>,
            $kernel::<$t, 4>,
        ]
    };
}
use half_kernels;

/// A [`HalfKernel`] `$name` running `$body::<T, N, $p>` (an `#[inline(always)]` body generic
/// over the product tag), compiled with `$features` so the body's intrinsics inline with the
/// features that product needs.
macro_rules! half_kernel_for_product {
    ($name:ident, $body:ident, $p:expr, $features:literal) => {
        /// [`HalfKernel`] of one product.
        ///
        /// # Safety
        /// As the body's; the CPU has the features this kernel is compiled with.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: u8, const N: usize>(
            panel: *const u8,
            nb: usize,
            half: usize,
            a: &[*const u8; TOKENS],
            out: crate::qdot::Out,
        ) {
            $body::<T, N, { $p }>(panel, nb, half, a, out)
        }
    };
}
use half_kernel_for_product;

/// Both halves of a panel against every token, [`TOKENS`] at a time: `kernels[n - 1]` takes a
/// chunk of n tokens (a last short chunk repeats its last pointer into the unused slots).
///
/// # Safety
/// The CPU has what the kernels need; `panel` holds `nb` blocks of the kernels' layout for both
/// halves, every activation row is as long as they read, and `out` is valid for 16 rows of
/// every token.
unsafe fn panel_times_tokens(
    panel: *const u8,
    nb: usize,
    acts: &[&[u8]],
    out: crate::qdot::Out,
    kernels: &[HalfKernel; TOKENS],
) {
    for (chunk, a) in acts.chunks(TOKENS).enumerate() {
        let p: [*const u8; TOKENS] = core::array::from_fn(|j| a[j.min(a.len() - 1)].as_ptr());
        for half in 0..2 {
            let o = crate::qdot::Out {
                ptr: out.ptr.add(chunk * TOKENS * out.ld + 8 * half),
                ld: out.ld,
            };
            kernels[a.len() - 1](panel, nb, half, &p, o);
        }
    }
}

/// Hints the `len` bytes at `p` (some distance ahead of the reads) into L1, so a stream of
/// weights keeps memory busy while the kernel works on what it has.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, len: usize) {
    let mut at = 0;
    while at < len {
        // SAFETY: a prefetch never faults (past the weights it does nothing); SSE is baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(at).cast(),
            )
        };
        at += 64;
    }
    // SAFETY: as above.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            p.wrapping_add(len - 1).cast(),
        )
    };
}

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
