//! Writes the seed corpora of the fuzz targets into `corpus/<target>/` (run by `seed.sh`).

use edgelm_fuzz::{bpe_vocab, spm_vocab, tensors_file, FIXED_TEXTS};
use std::path::Path;

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus".to_owned());
    let root = Path::new(&root);

    let vocabs = [
        ("spm-prefix.gguf", spm_vocab(true).to_bytes()),
        ("spm-noprefix.gguf", spm_vocab(false).to_bytes()),
        ("bpe-qwen2.gguf", bpe_vocab("qwen2").to_bytes()),
        ("bpe-llama3.gguf", bpe_vocab("llama-bpe").to_bytes()),
        ("bpe-default.gguf", bpe_vocab("default").to_bytes()),
    ];
    let tensors = tensors_file().to_bytes();
    for (name, bytes) in &vocabs {
        put(&root.join("tokenizer_from_gguf"), name, bytes);
        put(&root.join("gguf_parse"), name, bytes);
    }
    put(&root.join("gguf_parse"), "tensors.gguf", &tensors);
    put(&root.join("tokenizer_from_gguf"), "tensors.gguf", &tensors);

    for (i, text) in FIXED_TEXTS.iter().enumerate() {
        put(&root.join("tokenizer_encode"), &format!("text-{i}"), text.as_bytes());
    }

    // quant_dequant: [type selector, element count (u16 LE)] then the row bytes.
    let q = root.join("quant_dequant");
    for (i, ty) in edgelm_quant::GgmlType::ALL.iter().enumerate() {
        let n = ty.block_elems() as u16 * 2;
        let mut bytes = vec![i as u8];
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes.extend((0..ty.block_bytes() * 2).map(|j| (j * 37 + 11) as u8));
        put(&q, &format!("{ty}"), &bytes);
    }
    let mut all = vec![0xFF, 0, 1];
    all.extend([0x7F, 0xC0, 0xFF, 0xFF, 0x00, 0x7C, 0x00, 0x00].repeat(64));
    put(&q, "all-nan-inf", &all);
}
