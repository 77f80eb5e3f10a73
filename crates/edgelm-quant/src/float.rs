//! Plain float element types, each one element per "block".

/// F32: little-endian IEEE single.
pub mod fp32 {
    pub const BLOCK_ELEMS: usize = 1;
    pub const BLOCK_BYTES: usize = 4;

    pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
        y[0] = f32::from_le_bytes(*b);
    }

    pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
        *b = x[0].to_le_bytes();
    }
}

/// F16: IEEE half, converted with round-to-nearest-even like ggml.
pub mod fp16 {
    use half::f16;

    pub const BLOCK_ELEMS: usize = 1;
    pub const BLOCK_BYTES: usize = 2;

    pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
        y[0] = f16::from_le_bytes(*b).to_f32();
    }

    pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
        *b = f16::from_f32(x[0]).to_le_bytes();
    }
}

/// BF16: the top half of an f32, converted with round-to-nearest-even like ggml.
pub mod bf16 {
    use half::bf16;

    pub const BLOCK_ELEMS: usize = 1;
    pub const BLOCK_BYTES: usize = 2;

    pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
        y[0] = bf16::from_le_bytes(*b).to_f32();
    }

    pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
        *b = bf16::from_f32(x[0]).to_le_bytes();
    }
}
