//! Each malformed-file case ends in its own error, never a panic.

use edgelm_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value};

fn valid() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.add_f32("a", &[8], &[0.0; 8]).unwrap();
    w.add_tensor("b", &[32], GgmlType::Q8_0, vec![1; 34])
        .unwrap();
    w.to_bytes()
}

/// Offset of the first tensor-info record (after header and the one metadata pair).
fn tensor_info_offset() -> usize {
    4 + 4 + 8 + 8 + (8 + "general.architecture".len()) + 4 + (8 + "llama".len())
}

fn err(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("malformed file accepted"),
        Err(e) => e,
    }
}

#[test]
fn valid_file_parses() {
    let f = GgufFile::from_bytes(valid()).unwrap();
    assert_eq!(f.tensors().len(), 2);
}

#[test]
fn bad_magic() {
    let mut b = valid();
    b[0] = b'X';
    assert!(matches!(err(b), GgufError::BadMagic { .. }));
}

#[test]
fn bad_version() {
    let mut b = valid();
    b[4] = 9;
    assert!(matches!(err(b), GgufError::UnsupportedVersion(9)));
}

#[test]
fn absurd_counts() {
    let mut b = valid();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(b);
    assert!(matches!(e, GgufError::Implausible { .. }), "{e}");
    assert!(e.to_string().contains("tensor count"));
    let mut b = valid();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(err(b), GgufError::Implausible { .. }));
}

#[test]
fn absurd_string_length() {
    let mut b = valid();
    b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = err(b);
    assert!(e.to_string().contains("metadata key length"), "{e}");
}

#[test]
fn unknown_value_type() {
    let mut b = valid();
    let at = 24 + 8 + "general.architecture".len();
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = err(b);
    assert!(
        matches!(e, GgufError::UnknownValueType { id: 77, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("general.architecture"));
}

#[test]
fn unknown_tensor_type() {
    let mut b = valid();
    let at = tensor_info_offset() + 8 + 1 + 4 + 8;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = err(b);
    assert!(
        matches!(e, GgufError::UnknownTensorType { id: 99, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("\"a\""));
}

#[test]
fn shape_not_whole_blocks() {
    let mut b = valid();
    // Tensor "b" (Q8_0): set its row length to 31.
    let at = tensor_info_offset() + (8 + 1 + 4 + 8 + 4 + 8) + 8 + 1 + 4;
    b[at..at + 8].copy_from_slice(&31u64.to_le_bytes());
    let e = err(b);
    assert!(e.to_string().contains("not a multiple"), "{e}");
}

#[test]
fn data_out_of_range() {
    let mut b = valid();
    let at = tensor_info_offset() + (8 + 1 + 4 + 8 + 4 + 8) + 8 + 1 + 4 + 8;
    b[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    b[at + 4..at + 12].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let e = err(b);
    assert!(e.to_string().contains("\"b\""), "{e}");
}

#[test]
fn overlapping_tensors() {
    let mut b = valid();
    // Point tensor "b" at offset 0, where "a" lives.
    let at = tensor_info_offset() + (8 + 1 + 4 + 8 + 4 + 8) + 8 + 1 + 4 + 8 + 4;
    b[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    let e = err(b);
    assert!(e.to_string().contains("overlaps"), "{e}");
}

#[test]
fn every_truncation_is_an_error() {
    let b = valid();
    for n in 0..b.len() - 1 {
        let cut = b[..n].to_vec();
        // The last tensor's padding is not part of it; only cuts before its end must fail.
        if let Ok(f) = GgufFile::from_bytes(cut) {
            let t = f.tensor("b").unwrap();
            assert!(f.data_offset + t.info.offset + 34 <= n as u64);
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = valid();
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = base.clone();
        let pos = (state % b.len() as u64) as usize;
        b[pos] = (state >> 32) as u8;
        let _ = GgufFile::from_bytes(b);
    }
}
