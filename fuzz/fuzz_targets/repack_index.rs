//! The index of a repack cache file (written by edgelm beside a model, but read back from a disk
//! anything may have touched): parsing must return Some or None, never panic or allocate
//! without bound, and every entry it accepts must lie inside the bytes.
//!
//! Input: the file's bytes; the fingerprint expected is the one the bytes carry (bytes 16..24),
//! so inputs get past that check.
#![no_main]

use edgelm_models::repack_cache::parse_index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fp = data
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if let Some(entries) = parse_index(data, fp) {
        for e in entries {
            assert!(e.offset + e.len <= data.len() as u64 && e.offset % 64 == 0);
        }
    }
});
