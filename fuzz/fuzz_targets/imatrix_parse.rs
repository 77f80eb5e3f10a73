//! An importance matrix file (untrusted: `edgelm quantize --imatrix` reads files made by other
//! tools) in either format: parsing must return Ok or Err, never panic or allocate beyond the
//! input's size; what parses must answer `importance` for every entry and write back out.
#![no_main]

use edgelm_compress::imatrix::Imatrix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = if data.starts_with(b"GGUF") {
        edgelm_gguf::GgufFile::from_bytes(data.to_vec())
            .ok()
            .and_then(|f| Imatrix::from_gguf(f, "fuzz").ok())
    } else {
        Imatrix::from_legacy(data, "fuzz").ok()
    };
    if let Some(m) = parsed {
        for name in m.entries.keys() {
            let _ = m.importance(name);
        }
        let _ = m.to_legacy();
    }
});
