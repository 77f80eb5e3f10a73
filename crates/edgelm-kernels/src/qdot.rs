//! The fast path's kernel table: for each weight type, the activation format it pairs with
//! (8-bit blocks, as llama.cpp's `vec_dot_type`), a row quantizer for activations, and a row dot
//! product of one weight row with up to [`MAX_COLS`] activation rows at once — so prefill unpacks
//! each weight block once for several tokens. Chosen once per (weight type × ISA) at load; the
//! scalar entries wrap `edgelm_quant`'s integer reference, which every SIMD entry is tested against.

use crate::Isa;
use edgelm_quant::{int_dot, GgmlType};

/// Activation rows one row-dot call handles.
pub const MAX_COLS: usize = 8;

/// `row_r · acts[j]` into `out` at (r, j) for the `n_rows` weight rows of `row_bytes` at the
/// start of `w`, each `acts[j]` as many elements in the activation format: one call per block
/// of rows, lengths checked once for the block.
///
/// # Safety
/// The CPU supports the ISA the function was built for; `out` is valid for every (r, j).
pub type RowDotFn = unsafe fn(w: &[u8], row_bytes: usize, n_rows: usize, acts: &[&[u8]], out: Out);

/// Where a block of row dots lands: (row r, activation j) at `ptr[j·ld + r]`, so the matrix
/// product's token-major output takes them in place.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub ptr: *mut f32,
    pub ld: usize,
}

impl Out {
    /// The block's results as one slice, (r, j) at `j·ld + r`.
    pub fn slice(out: &mut [f32], ld: usize) -> Out {
        Out {
            ptr: out.as_mut_ptr(),
            ld,
        }
    }

    /// Row `r`'s results for activations `j0..j0 + vals.len()`.
    ///
    /// # Safety
    /// Every written position is valid and not accessed concurrently.
    #[inline(always)]
    pub unsafe fn put(self, r: usize, j0: usize, vals: &[f32]) {
        for (j, &v) in vals.iter().enumerate() {
            *self.ptr.add((j0 + j) * self.ld + r) = v;
        }
    }
}

/// [`RowDotFn`] over one panel of interleaved weight rows (or a last partial panel, in GGUF
/// order) and packed activation rows: `n_rows` is [`crate::interleave::PANEL`] but at the end.
///
/// # Safety
/// As for [`RowDotFn`].
pub type InterleavedDotFn = RowDotFn;

/// Decodes one whole panel of weight rows (`row_bytes` each, at the start of `w`) into `dst`.
///
/// # Safety
/// The CPU supports the ISA the function was built for.
pub type DecodeFn = unsafe fn(w: &[u8], row_bytes: usize, dst: &mut [u8]);

/// A decoded panel of `cols` columns times each of `acts` (at most [`MAX_COLS`]), row `r` of
/// activation `j` to `out` at (r, j).
///
/// # Safety
/// As for [`RowDotFn`]; `dec` was written by the matching [`DecodeFn`].
pub type DecodedDotFn = unsafe fn(dec: &[u8], cols: usize, acts: &[&[u8]], out: Out);

/// A prompt's way through a weight on an ISA without a byte dot product (AVX2): each panel of
/// [`crate::interleave::PANEL`] rows decoded once to 8-bit codes and f32 scales, then read by
/// every tile of tokens — unpacking nibbles and fifth bits per tile would cost as much as the
/// products. Worth it from [`PanelPrefill::min_tokens`] on.
#[derive(Clone, Copy)]
pub struct PanelPrefill {
    /// It decodes interleaved panels (else GGUF rows).
    pub from_interleaved: bool,
    /// Tokens from which decoding pays for itself (more than one tile at least).
    pub min_tokens: usize,
    /// Bytes of one decoded panel of `cols` columns.
    pub bytes: fn(cols: usize) -> usize,
    pub decode: DecodeFn,
    pub dot: DecodedDotFn,
}

/// The body of a [`RowDotFn`]: for each weight row `r < n_rows` and each chunk `a` of at most
/// [`MAX_COLS`] activation rows, `$call` fills `o` with `N` results (`N` the chunk's length, a
/// const there, so the kernel is the monomorphic one of its width), stored through `out`.
macro_rules! row_tiles {
    ($n_rows:expr, $acts:expr, $out:expr, |$r:ident, $a:ident, $o:ident, $n:ident| $call:expr) => {
        for $r in 0..$n_rows {
            for (chunk, $a) in $acts.chunks($crate::qdot::MAX_COLS).enumerate() {
                let mut $o = [0f32; $crate::qdot::MAX_COLS];
                match $a.len() {
                    1 => {
                        const $n: usize = 1;
                        $call
                    }
                    2 => {
                        const $n: usize = 2;
                        $call
                    }
                    3 => {
                        const $n: usize = 3;
                        $call
                    }
                    4 => {
                        const $n: usize = 4;
                        $call
                    }
                    5 => {
                        const $n: usize = 5;
                        $call
                    }
                    6 => {
                        const $n: usize = 6;
                        $call
                    }
                    7 => {
                        const $n: usize = 7;
                        $call
                    }
                    _ => {
                        const $n: usize = 8;
                        $call
                    }
                }
                $out.put($r, chunk * $crate::qdot::MAX_COLS, &$o[..$a.len()]);
            }
        }
    };
}
pub(crate) use row_tiles;

/// Quantize one row of f32 activations into the activation format.
///
/// # Safety
/// As for [`RowDotFn`]; `out` has exactly the bytes for `x.len()` elements.
pub type QuantizeFn = unsafe fn(x: &[f32], out: &mut [u8]);

#[derive(Clone, Copy)]
pub struct QuantKernel {
    pub weight: GgmlType,
    pub act: GgmlType,
    pub isa: Isa,
    pub row_dot: RowDotFn,
    pub quantize: QuantizeFn,
    /// The row dot over weights repacked by `Compute::interleave_into` and activations packed by
    /// `interleave::pack_activations`, where this ISA has one.
    pub interleaved: Option<InterleavedDotFn>,
    /// Decode-once panels for prompts, where this ISA has them.
    pub prefill: Option<PanelPrefill>,
}

/// The kernel for weight type `ty` on `isa`, falling back to the scalar reference for types the
/// ISA has no specialised kernel for. None if the type cannot be a weight.
pub fn kernel_for(isa: Isa, ty: GgmlType) -> Option<QuantKernel> {
    if !int_dot::can_vec_dot(ty) {
        return None;
    }
    let act = int_dot::activation_type(ty);
    let scalar = QuantKernel {
        weight: ty,
        act,
        isa: Isa::Scalar,
        row_dot: scalar_row_dot_for(ty),
        quantize: scalar_quantize_for(act),
        interleaved: None,
        prefill: None,
    };
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => {
            let k =
                crate::x86::avx512_quant::kernel(ty).or_else(|| crate::x86::avx2_quant::kernel(ty));
            return Some(k.unwrap_or(scalar));
        }
        Isa::AvxVnni => return Some(crate::x86::avx2_quant::vnni_kernel(ty).unwrap_or(scalar)),
        Isa::Avx2 => return Some(crate::x86::avx2_quant::kernel(ty).unwrap_or(scalar)),
        Isa::Scalar => {}
    }
    Some(scalar)
}

fn scalar_row_dot_for(ty: GgmlType) -> RowDotFn {
    use GgmlType::*;
    // One monomorphic function per type, so the table holds plain fn pointers.
    macro_rules! row_dot {
        ($t:ident) => {{
            unsafe fn f(w: &[u8], row_bytes: usize, n_rows: usize, acts: &[&[u8]], out: Out) {
                for (r, row) in w.chunks_exact(row_bytes).take(n_rows).enumerate() {
                    for (j, a) in acts.iter().enumerate() {
                        let v = int_dot::vec_dot($t, row, a).unwrap_or(f32::NAN);
                        out.put(r, j, &[v]);
                    }
                }
            }
            f as RowDotFn
        }};
    }
    match ty {
        F32 => row_dot!(F32),
        F16 => row_dot!(F16),
        BF16 => row_dot!(BF16),
        Q4_0 => row_dot!(Q4_0),
        Q4_1 => row_dot!(Q4_1),
        Q5_0 => row_dot!(Q5_0),
        Q5_1 => row_dot!(Q5_1),
        Q8_0 => row_dot!(Q8_0),
        Q2_K => row_dot!(Q2_K),
        Q3_K => row_dot!(Q3_K),
        Q4_K => row_dot!(Q4_K),
        Q5_K => row_dot!(Q5_K),
        Q6_K => row_dot!(Q6_K),
        Q8_1 => row_dot!(Q8_1),
        Q8_K => row_dot!(Q8_K),
        IQ4_NL => row_dot!(IQ4_NL),
        IQ4_XS => row_dot!(IQ4_XS),
    }
}

fn scalar_quantize_for(act: GgmlType) -> QuantizeFn {
    use GgmlType::*;
    macro_rules! quantize {
        ($t:ident) => {{
            unsafe fn f(x: &[f32], out: &mut [u8]) {
                // Lengths are checked by the caller; an error here would be a caller bug.
                let _ = edgelm_quant::quantize_row($t, x, out);
            }
            f as QuantizeFn
        }};
    }
    match act {
        Q8_0 => quantize!(Q8_0),
        Q8_1 => quantize!(Q8_1),
        Q8_K => quantize!(Q8_K),
        F16 => quantize!(F16),
        BF16 => quantize!(BF16),
        _ => quantize!(F32),
    }
}
