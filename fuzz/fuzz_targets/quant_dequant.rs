//! Arbitrary bytes and lengths into the row-level quantization entry points: `dequantize_row`,
//! `dot_f32` and `quantize_row` must return Ok or Err (Ok whenever the lengths match), never
//! panic, for every supported type.
#![no_main]

use edgelm_quant::{can_dequantize, can_quantize, dequantize_row, dot_f32, quantize_row, GgmlType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, src)) = data.split_first_chunk::<3>() else {
        return;
    };
    // An arbitrary element count, usually not matching the bytes.
    let n_any = u16::from_le_bytes([head[1], head[2]]) as usize;
    let only = head[0] as usize;
    for (i, &ty) in GgmlType::ALL.iter().enumerate() {
        // The low bits of the first byte pick one type; 0xFF.. runs all of them.
        if only < 0xF0 && only % GgmlType::ALL.len() != i {
            continue;
        }
        if !can_dequantize(ty) {
            continue;
        }
        let mut out = vec![0f32; n_any];
        let _ = dequantize_row(ty, src, &mut out);
        let _ = dot_f32(ty, src, &out);

        // Whole blocks of the given bytes: the lengths match, so this must succeed.
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        let blocks = src.len() / bb;
        let row = &src[..blocks * bb];
        let mut out = vec![0f32; blocks * be];
        dequantize_row(ty, row, &mut out).expect("matching lengths dequantize");
        dot_f32(ty, row, &out).expect("matching lengths dot");

        if can_quantize(ty) {
            // The same bytes read as f32 (NaN, infinities, subnormals included) quantized back.
            let floats: Vec<f32> = src
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let n = floats.len() / be * be;
            let mut q = vec![0u8; n / be * bb];
            quantize_row(ty, &floats[..n], &mut q).expect("matching lengths quantize");
            let mut back = vec![0f32; n];
            dequantize_row(ty, &q, &mut back).expect("quantized row dequantizes");
            // The dequantized output of arbitrary blocks, quantized again.
            let mut q2 = vec![0u8; row.len()];
            quantize_row(ty, &out, &mut q2).expect("matching lengths quantize");
        }
    }
});
