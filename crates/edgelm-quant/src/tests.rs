//! Cross-format tests: row API, round trips, dot products, length errors.

use crate::*;

/// Tiny deterministic xorshift PRNG so tests need no extra dependency.
pub(crate) struct Rng(pub u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal (sum of uniforms), mean 0, std 1.
    pub(crate) fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.uniform()).sum::<f32>() - 6.0
    }
    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale + offset).collect()
    }
}

fn bytes_for(ty: GgmlType, n: usize) -> usize {
    ty.bytes_for(n as u64).expect("whole blocks") as usize
}

fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; bytes_for(ty, x.len())];
    quantize_row(ty, x, &mut q).expect("quantize");
    q
}

fn dequant(ty: GgmlType, q: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    dequantize_row(ty, q, &mut y).expect("dequantize");
    y
}

/// RMS error of the round trip relative to the RMS of the data.
fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let (mut e, mut s) = (0f64, 0f64);
    for (a, b) in x.iter().zip(y) {
        e += ((a - b) as f64).powi(2);
        s += (*a as f64).powi(2);
    }
    (e / s).sqrt()
}

#[test]
fn block_constants_match_gguf_geometry() {
    use GgmlType::*;
    let table = [
        (F32, fp32::BLOCK_BYTES, fp32::BLOCK_ELEMS),
        (F16, fp16::BLOCK_BYTES, fp16::BLOCK_ELEMS),
        (BF16, bf16::BLOCK_BYTES, bf16::BLOCK_ELEMS),
        (Q4_0, q4_0::BLOCK_BYTES, q4_0::BLOCK_ELEMS),
        (Q4_1, q4_1::BLOCK_BYTES, q4_1::BLOCK_ELEMS),
        (Q5_0, q5_0::BLOCK_BYTES, q5_0::BLOCK_ELEMS),
        (Q5_1, q5_1::BLOCK_BYTES, q5_1::BLOCK_ELEMS),
        (Q8_0, q8_0::BLOCK_BYTES, q8_0::BLOCK_ELEMS),
        (Q8_1, q8_1::BLOCK_BYTES, q8_1::BLOCK_ELEMS),
        (Q2_K, q2_k::BLOCK_BYTES, q2_k::BLOCK_ELEMS),
        (Q3_K, q3_k::BLOCK_BYTES, q3_k::BLOCK_ELEMS),
        (Q4_K, q4_k::BLOCK_BYTES, q4_k::BLOCK_ELEMS),
        (Q5_K, q5_k::BLOCK_BYTES, q5_k::BLOCK_ELEMS),
        (Q6_K, q6_k::BLOCK_BYTES, q6_k::BLOCK_ELEMS),
        (Q8_K, q8_k::BLOCK_BYTES, q8_k::BLOCK_ELEMS),
        (IQ4_NL, iq4_nl::BLOCK_BYTES, iq4_nl::BLOCK_ELEMS),
        (IQ4_XS, iq4_xs::BLOCK_BYTES, iq4_xs::BLOCK_ELEMS),
    ];
    assert_eq!(table.len(), GgmlType::ALL.len());
    for (ty, bytes, elems) in table {
        assert_eq!(ty.block_bytes(), bytes, "{ty}");
        assert_eq!(ty.block_elems(), elems, "{ty}");
        assert!(can_dequantize(ty) && can_quantize(ty), "{ty}");
    }
}

#[test]
fn float_rows() {
    let x = [1.0f32, -2.5, 65504.0, 1.0e-3, f32::INFINITY];
    let mut b = vec![0u8; 20];
    quantize_row(GgmlType::F32, &x, &mut b).unwrap();
    assert_eq!(&b[4..8], &(-2.5f32).to_le_bytes());
    assert_eq!(dequant(GgmlType::F32, &b, 5), x);

    // F16: 1.0 = 0x3C00, -2.5 = 0xC100, 65504 = 0x7BFF, +inf = 0x7C00 (little-endian)
    let h = quant(GgmlType::F16, &x);
    assert_eq!(&h[0..6], &[0x00, 0x3C, 0x00, 0xC1, 0xFF, 0x7B]);
    assert_eq!(&h[8..10], &[0x00, 0x7C]);
    let y = dequant(GgmlType::F16, &h, 5);
    assert_eq!(&y[..3], &x[..3]);
    assert!((y[3] - 1.0e-3).abs() < 1e-6);

    // BF16 is the top half of the f32: 1.0 = 0x3F80, -2.5 = 0xC020.
    let bb = quant(GgmlType::BF16, &x);
    assert_eq!(&bb[0..4], &[0x80, 0x3F, 0x20, 0xC0]);
    let y = dequant(GgmlType::BF16, &bb, 5);
    assert_eq!(&y[..2], &x[..2]);
    assert_eq!(y[2], 65536.0); // 65504 rounds to nearest bf16
                               // Hand-built: 0x4049 = 3.140625
    let mut one = [0f32; 1];
    dequantize_row(GgmlType::BF16, &[0x49, 0x40], &mut one).unwrap();
    assert_eq!(one[0], 3.140625);
}

/// Round-trip bounds per type on normal data at several scales and offsets (relative RMS
/// error), about 10% above what the quantizers achieve so regressions show.
#[test]
fn round_trip_error_bounds() {
    use GgmlType::*;
    let bounds = [
        (F32, 0.0),
        (F16, 3e-4),
        (BF16, 2e-3),
        (Q8_0, 0.006),
        (Q8_1, 0.006),
        (Q8_K, 0.0075),
        (Q6_K, 0.019),
        (Q5_0, 0.047),
        (Q5_1, 0.04),
        (Q5_K, 0.039),
        (Q4_0, 0.093),
        (Q4_1, 0.083),
        (IQ4_NL, 0.083),
        (IQ4_XS, 0.083),
        (Q4_K, 0.076),
        (Q3_K, 0.15),
        (Q2_K, 0.285),
    ];
    assert_eq!(bounds.len(), GgmlType::ALL.len());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let n = 4096;
    let mut report = String::new();
    let mut failed = false;
    for (ty, bound) in bounds {
        for (scale, offset) in [(1.0, 0.0), (0.02, 0.01), (300.0, -50.0)] {
            let x = rng.vec(n, scale, offset);
            let y = dequant(ty, &quant(ty, &x), n);
            let err = rel_rmse(&x, &y);
            failed |= err > bound;
            report += &format!("{ty} scale {scale}: relative rmse {err:.5} (bound {bound})\n");
        }
    }
    assert!(!failed, "{report}");
}

/// Special inputs must round-trip sensibly: zeros stay zero, constants stay close.
#[test]
fn round_trip_special_blocks() {
    for ty in GgmlType::ALL {
        let n = 512;
        let y = dequant(ty, &quant(ty, &vec![0.0; n]), n);
        assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros");
        for c in [1.5f32, -0.75] {
            let y = dequant(ty, &quant(ty, &vec![c; n]), n);
            for v in y {
                assert!((v - c).abs() <= 0.02 * c.abs(), "{ty}: constant {c} -> {v}");
            }
        }
        // One spike among zeros keeps its value to within the format's step.
        let mut x = vec![0.0f32; n];
        x[300] = -4.0;
        let y = dequant(ty, &quant(ty, &x), n);
        assert!((y[300] + 4.0).abs() < 0.05, "{ty}: spike -> {}", y[300]);
        // Non-finite inputs must not panic.
        let mut x = vec![1.0f32; n];
        x[7] = f32::NAN;
        x[8] = f32::INFINITY;
        let _ = quant(ty, &x);
    }
}

#[test]
fn dot_f32_matches_dequantized_dot() {
    let mut rng = Rng(42);
    let n = 1024;
    for ty in GgmlType::ALL {
        let w = quant(ty, &rng.vec(n, 1.0, 0.1));
        let x = rng.vec(n, 1.0, 0.0);
        let y = dequant(ty, &w, n);
        let mut expect = 0f32;
        for (a, b) in y.iter().zip(&x) {
            expect += a * b;
        }
        // Same order of the same f32 operations: bit-equal.
        assert_eq!(dot_f32(ty, &w, &x).unwrap(), expect, "{ty}");
    }
}

#[test]
fn int_dot_agrees_with_dequantized_dot() {
    use int_dot::{activation_type, vec_dot};
    let mut rng = Rng(7);
    let n = 2048;
    for ty in GgmlType::ALL {
        if !int_dot::can_vec_dot(ty) {
            continue;
        }
        let at = activation_type(ty);
        for (ws, wo, xs) in [(1.0, 0.0, 1.0), (0.05, 0.3, 3.0), (2.0, -1.0, 0.01)] {
            let w = quant(ty, &rng.vec(n, ws, wo));
            let a = quant(at, &rng.vec(n, xs, 0.0));
            let wd = dequant(ty, &w, n);
            let ad = dequant(at, &a, n);
            let (mut exact, mut mag) = (0f64, 0f64);
            for (p, q) in wd.iter().zip(&ad) {
                exact += (*p as f64) * (*q as f64);
                mag += ((*p as f64) * (*q as f64)).abs();
            }
            let got = vec_dot(ty, &w, &a).unwrap() as f64;
            // f32 accumulation, plus Q8_1's f16-rounded s for the offset term.
            let tol = 1e-5 * mag
                + if at == GgmlType::Q8_1 {
                    2e-3 * mag
                } else {
                    0.0
                };
            assert!(
                (got - exact).abs() <= tol,
                "{ty}: int dot {got} vs dequantized {exact} (tol {tol})"
            );
        }
    }
}

/// Hand-built Q4_0 x Q8_0 blocks with a hand-computed result.
#[test]
fn int_dot_hand_blocks() {
    let mut w = [0u8; 18];
    w[0..2].copy_from_slice(&0x4000u16.to_le_bytes()); // d = 2
    w[2] = 0x9A; // elem 0: 10 - 8 = 2, elem 16: 9 - 8 = 1
    w[3] = 0x08; // elem 1: 0, elem 17: -8
    for b in &mut w[4..] {
        *b = 0x88; // zeros
    }
    let mut a = [0u8; 34];
    a[0..2].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
    a[2] = 3; // elem 0
    a[2 + 16] = (-4i8) as u8; // elem 16
    a[2 + 17] = 5; // elem 17
                   // sumi = 2*3 + 1*(-4) + (-8)*5 = -38; times 2 * 0.5
    let got = int_dot::vec_dot(GgmlType::Q4_0, &w, &a).unwrap();
    assert_eq!(got, -38.0);
    assert_eq!(int_dot::q4_0_q8_0(&w, &a), -38.0);

    // Q6_K x Q8_K: one element of each, everything else at q = 32 (zero) or zero activation.
    let mut w = [0u8; q6_k::BLOCK_BYTES];
    w[208..210].copy_from_slice(&0x3C00u16.to_le_bytes()); // d = 1
    w[192 + 4] = 3; // sub 4 (elements 64..80) scale 3
                    // all quants default to 0 -> -32; elem 64 = ql[0] high nibble 1, qh[0] bits 4-5 = 2 -> 33 -> 1
    w[0] = 0x10;
    w[128] = 0b10 << 4;
    let mut a = [0u8; q8_k::BLOCK_BYTES];
    a[0..4].copy_from_slice(&0.25f32.to_le_bytes());
    a[4 + 64] = 8;
    a[4 + 65] = 1; // meets q = -32
                   // isum = 3 * (1*8 + (-32)*1) = -72; times 1 * 0.25
    assert_eq!(int_dot::vec_dot(GgmlType::Q6_K, &w, &a).unwrap(), -18.0);
}

#[test]
fn q8_k_bsums_drive_min_terms() {
    // The k-quant dots use the activation's bsums, as llama.cpp does; check they are the
    // ones quantize_row writes by comparing against a block whose bsums were zeroed.
    let mut rng = Rng(99);
    let w = quant(GgmlType::Q4_K, &rng.vec(256, 1.0, -0.5));
    let mut a = quant(GgmlType::Q8_K, &rng.vec(256, 1.0, 0.5));
    let with = int_dot::vec_dot(GgmlType::Q4_K, &w, &a).unwrap();
    a[260..292].fill(0);
    let without = int_dot::vec_dot(GgmlType::Q4_K, &w, &a).unwrap();
    assert_ne!(with, without);
}

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let be = ty.block_elems();
        let bb = ty.block_bytes();
        let mut y = vec![0f32; 2 * be];
        // Source one byte short / long.
        assert!(
            dequantize_row(ty, &vec![0u8; 2 * bb - 1], &mut y).is_err(),
            "{ty}"
        );
        assert!(
            dequantize_row(ty, &vec![0u8; 2 * bb + 1], &mut y).is_err(),
            "{ty}"
        );
        assert!(dot_f32(ty, &vec![0u8; bb], &y).is_err(), "{ty}");
        assert!(
            quantize_row(ty, &y, &mut vec![0u8; 2 * bb + 1]).is_err(),
            "{ty}"
        );
        if be > 1 {
            // A partial block of elements.
            let mut p = vec![0f32; be + 1];
            assert!(matches!(
                dequantize_row(ty, &vec![0u8; bb], &mut p),
                Err(QuantError::PartialBlock { .. })
            ));
            assert!(quantize_row(ty, &p, &mut vec![0u8; bb]).is_err());
            assert!(dot_f32(ty, &vec![0u8; bb], &p).is_err());
        }
        // Empty rows are fine.
        assert!(dequantize_row(ty, &[], &mut []).is_ok());

        if int_dot::can_vec_dot(ty) {
            let at = int_dot::activation_type(ty);
            let w = vec![0u8; 2 * bb];
            let a = vec![0u8; 2 * at.block_bytes()];
            assert!(int_dot::vec_dot(ty, &w, &a).is_ok(), "{ty}");
            assert!(int_dot::vec_dot(ty, &w, &a[1..]).is_err(), "{ty}");
            assert!(int_dot::vec_dot(ty, &w[..bb], &a).is_err(), "{ty}");
            if bb > 1 {
                assert!(int_dot::vec_dot(ty, &w[1..], &a).is_err(), "{ty}");
            }
        } else {
            assert!(matches!(
                int_dot::vec_dot(ty, &[], &[]),
                Err(QuantError::Unsupported { .. })
            ));
        }
    }
    let err = dequantize_row(GgmlType::Q4_K, &[0u8; 100], &mut [0f32; 256]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("Q4_K") && msg.contains("144") && msg.contains("100"),
        "{msg}"
    );
}

#[test]
fn activation_types() {
    use int_dot::activation_type as at;
    use GgmlType::*;
    assert_eq!(at(Q4_0), Q8_0);
    assert_eq!(at(Q5_0), Q8_0);
    assert_eq!(at(Q8_0), Q8_0);
    assert_eq!(at(Q4_1), Q8_1);
    assert_eq!(at(Q5_1), Q8_1);
    for k in [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
        assert_eq!(at(k), Q8_K);
    }
}

/// A model requantized from a k-quant file keeps its values where the new type can hold them:
/// Q4_K's values (codes 0..15 under 6-bit scales and mins) are Q5_K values too, and each
/// requantizes to the same values within f32 rounding, with or without importance weights.
#[test]
fn k_quant_grids_requantize_exactly() {
    let mut rng = Rng(23);
    let x = rng.vec(8 * 256, 0.05, 0.0);
    let on_grid = dequant(GgmlType::Q4_K, &quant(GgmlType::Q4_K, &x), x.len());
    let importance: Vec<f32> = (0..x.len()).map(|_| 0.1 + rng.uniform()).collect();
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
        for imp in [None, Some(&importance[..])] {
            let mut q = vec![0u8; bytes_for(ty, x.len())];
            quantize_row_weighted(ty, &on_grid, imp, &mut q).expect("quantize");
            let e = rel_rmse(&on_grid, &dequant(ty, &q, x.len()));
            assert!(e < 1e-4, "{ty:?} importance {}: {e}", imp.is_some());
        }
    }
}
