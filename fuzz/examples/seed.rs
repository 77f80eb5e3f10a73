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
        put(
            &root.join("tokenizer_encode"),
            &format!("text-{i}"),
            text.as_bytes(),
        );
    }

    // tokenizer_vocab: [flags] tokens \0-separated \x01 types \x01 merges \0-separated \x01 text.
    let v = root.join("tokenizer_vocab");
    let seeds: &[(&str, u8, &str)] = &[
        // SentencePiece, byte tokens, scores, space prefix, BOS.
        (
            "spm",
            0xC0 | 0x10 | 0x08,
            "<unk>\0<s>\0</s>\0a\0b\0ab\0\u{2581}\0\u{2581}a\0<|im_end|>\0\n\n\x012331111134\x01\x01ab ab<|im_end|>\n\nx",
        ),
        // Byte-level BPE (qwen2) with all byte tokens and merges.
        (
            "bpe",
            0x81 | 0x40,
            "ab\0Ġa\0Ġ\0<|im_end|>\0<tool>\x0111134\x01a b\0Ġ a\0b c\0ab c\x01ab a<tool> <|im_end|>",
        ),
        // BPE without byte tokens (llama-bpe, ignore_merges): unknown bytes are dropped.
        ("bpe-sparse", 0x03, "a\0b\0ab\x01\x01a b\x01abc \u{e9}"),
    ];
    for (name, flags, body) in seeds {
        let mut bytes = vec![*flags];
        bytes.extend_from_slice(body.as_bytes());
        put(&v, name, &bytes);
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
