//! Behaviour on tiny vocabularies written with GgufWriter.

use edgelm_gguf::{GgufFile, GgufWriter, Value, ValueType};
use edgelm_tokenizer::{Encode, StreamDecoder, Tokenizer, TokenizerError};

fn strs(v: &[&str]) -> Value {
    array(
        ValueType::String,
        v.iter().map(|s| Value::String(s.to_string())).collect(),
    )
}

fn load(w: &GgufWriter) -> Result<Tokenizer, TokenizerError> {
    let file = GgufFile::from_bytes(w.to_bytes()).expect("valid gguf");
    Tokenizer::from_gguf(&file)
}

// Token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const BYTE: i32 = 6;

/// A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then `pieces`.
fn spm_writer(pieces: &[(&str, f32, i32)]) -> GgufWriter {
    let mut texts: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0.0f32; 3];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for b in 0..=255u8 {
        texts.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(BYTE);
    }
    for &(t, s, ty) in pieces {
        texts.push(t.into());
        scores.push(s);
        types.push(ty);
    }
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        array(
            ValueType::String,
            texts.into_iter().map(Value::String).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.scores",
        array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
    );
    w.set(
        "tokenizer.ggml.token_type",
        array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    w
}

fn ids_of(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts
        .iter()
        .map(|t| {
            tok.token_id(t)
                .unwrap_or_else(|| panic!("{t:?} not in vocab"))
        })
        .collect()
}

#[test]
fn spm_merges_highest_score_first() {
    let vocab = |ab: f32, bc: f32| {
        let mut w = spm_writer(&[
            ("a", -5.0, NORMAL),
            ("b", -5.0, NORMAL),
            ("c", -5.0, NORMAL),
            ("ab", ab, NORMAL),
            ("bc", bc, NORMAL),
        ]);
        w.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
        load(&w).unwrap()
    };
    let tok = vocab(-1.0, -0.5);
    assert_eq!(
        tok.encode("abc", Encode::TEXT).unwrap(),
        ids_of(&tok, &["a", "bc"])
    );
    let tok = vocab(-0.5, -1.0);
    assert_eq!(
        tok.encode("abc", Encode::TEXT).unwrap(),
        ids_of(&tok, &["ab", "c"])
    );
    // Equal scores: the leftmost pair wins.
    let tok = vocab(-1.0, -1.0);
    assert_eq!(
        tok.encode("abc", Encode::TEXT).unwrap(),
        ids_of(&tok, &["ab", "c"])
    );
}

#[test]
fn spm_space_prefix_bos_and_decode() {
    let w = spm_writer(&[
        ("\u{2581}", -1.0, NORMAL),
        ("a", -5.0, NORMAL),
        ("b", -5.0, NORMAL),
        ("\u{2581}ab", -2.0, NORMAL),
        ("\u{2581}a", -3.0, NORMAL),
    ]);
    let tok = load(&w).unwrap();
    // SentencePiece defaults: add BOS (<s> = 1) and a space prefix.
    assert!(tok.adds_bos());
    assert_eq!(tok.bos(), Some(1));
    let ids = tok
        .encode(
            "ab b",
            Encode {
                add_special: true,
                parse_special: false,
            },
        )
        .unwrap();
    let mut want = vec![1];
    want.extend(ids_of(&tok, &["\u{2581}ab", "\u{2581}", "b"]));
    assert_eq!(ids, want);
    // The leading space the encoder added is dropped again, the inner one kept.
    assert_eq!(tok.decode(&ids[1..]).unwrap(), "ab b");
    assert_eq!(tok.token_piece_bytes(want[1]), Some(&b" ab"[..]));
}

#[test]
fn spm_byte_fallback_for_unknown_characters() {
    let mut w = spm_writer(&[("a", -1.0, NORMAL)]);
    w.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let tok = load(&w).unwrap();
    let ids = tok.encode("aé", Encode::TEXT).unwrap();
    assert_eq!(ids, ids_of(&tok, &["a", "<0xC3>", "<0xA9>"]));
    assert_eq!(tok.token_piece_bytes(ids[1]), Some(&[0xC3u8][..]));
    assert_eq!(tok.decode(&ids).unwrap(), "aé");
}

#[test]
fn spm_special_tokens_cut_out_first() {
    let mut w = spm_writer(&[
        ("x", -1.0, NORMAL),
        ("y", -1.0, NORMAL),
        ("<start>", 0.0, CONTROL),
        ("\n\n", 0.0, USER),
    ]);
    w.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let tok = load(&w).unwrap();
    let start = tok.token_id("<start>").unwrap();
    let nl2 = tok.token_id("\n\n").unwrap();
    assert_eq!(
        tok.encode(
            "x<start>y\n\nx",
            Encode {
                add_special: false,
                parse_special: true
            }
        )
        .unwrap(),
        vec![
            tok.token_id("x").unwrap(),
            start,
            tok.token_id("y").unwrap(),
            nl2,
            tok.token_id("x").unwrap()
        ]
    );
    // Without parse_special the control token is plain text (bytes here); the user-defined
    // token is still cut out.
    let ids = tok.encode("x<start>y\n\nx", Encode::TEXT).unwrap();
    assert!(!ids.contains(&start));
    assert!(ids.contains(&nl2));
    // Control tokens render as nothing unless asked for.
    assert_eq!(tok.token_piece_bytes(start), Some(&b""[..]));
    assert_eq!(tok.token_piece_bytes_special(start), Some(&b"<start>"[..]));
}

/// A byte-level BPE vocabulary. Byte-level spelling: space is "Ġ", 0xC3 is "Ã", 0xA9 is "©".
fn bpe_writer(tokens: &[(&str, i32)], merges: &[&str], pre: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String(pre.into()));
    w.set(
        "tokenizer.ggml.tokens",
        strs(&tokens.iter().map(|t| t.0).collect::<Vec<_>>()),
    );
    w.set(
        "tokenizer.ggml.token_type",
        array(
            ValueType::I32,
            tokens.iter().map(|t| Value::I32(t.1)).collect(),
        ),
    );
    w.set("tokenizer.ggml.merges", strs(merges));
    w
}

const BPE_TOKENS: &[(&str, i32)] = &[
    ("a", NORMAL),
    ("b", NORMAL),
    ("c", NORMAL),
    ("ab", NORMAL),
    ("bc", NORMAL),
    ("abc", NORMAL),
    ("Ġ", NORMAL),
    ("Ġa", NORMAL),
    ("<", NORMAL),
    ("|", NORMAL),
    ("x", NORMAL),
    (">", NORMAL),
    ("Ã", NORMAL),
    ("©", NORMAL),
    ("<|x|>", CONTROL),
    ("<|x|>c", CONTROL),
    ("<tool>", USER),
    ("<|im_end|>", CONTROL),
    ("<|endoftext|>", CONTROL),
];

#[test]
fn bpe_merges_by_rank() {
    let tok = load(&bpe_writer(BPE_TOKENS, &["b c", "a b", "ab c"], "qwen2")).unwrap();
    // "b c" ranks first, and no merge joins "a" with "bc".
    assert_eq!(
        tok.encode("abc", Encode::TEXT).unwrap(),
        ids_of(&tok, &["a", "bc"])
    );
    let tok = load(&bpe_writer(BPE_TOKENS, &["a b", "b c", "ab c"], "qwen2")).unwrap();
    assert_eq!(
        tok.encode("abc", Encode::TEXT).unwrap(),
        ids_of(&tok, &["abc"])
    );
    // Pre-tokens are merged separately: " a" is its own word.
    assert_eq!(
        tok.encode("abc a", Encode::TEXT).unwrap(),
        ids_of(&tok, &["abc", "Ġ", "a"])
    );
    let tok = load(&bpe_writer(BPE_TOKENS, &["Ġ a", "a b"], "qwen2")).unwrap();
    assert_eq!(
        tok.encode("ab a", Encode::TEXT).unwrap(),
        ids_of(&tok, &["ab", "Ġa"])
    );
    assert_eq!(tok.decode(&ids_of(&tok, &["ab", "Ġa"])).unwrap(), "ab a");
}

#[test]
fn bpe_special_tokens_longest_first_and_only_when_parsing() {
    let tok = load(&bpe_writer(BPE_TOKENS, &["a b"], "qwen2")).unwrap();
    let x = tok.token_id("<|x|>").unwrap();
    let xc = tok.token_id("<|x|>c").unwrap();
    let tool = tok.token_id("<tool>").unwrap();
    assert_eq!(
        tok.encode(
            "ab<|x|>a<|x|>c",
            Encode {
                add_special: false,
                parse_special: true
            }
        )
        .unwrap(),
        vec![
            tok.token_id("ab").unwrap(),
            x,
            tok.token_id("a").unwrap(),
            xc
        ]
    );
    // Not parsed: spelled out from ordinary tokens.
    assert_eq!(
        tok.encode("<|x|>", Encode::TEXT).unwrap(),
        ids_of(&tok, &["<", "|", "x", "|", ">"])
    );
    // User-defined tokens are always cut out.
    assert_eq!(
        tok.encode("a<tool>", Encode::TEXT).unwrap(),
        vec![tok.token_id("a").unwrap(), tool]
    );
    // No BOS for this vocabulary unless the metadata asks.
    assert!(!tok.adds_bos());
}

#[test]
fn end_of_generation_tokens() {
    let mut w = bpe_writer(BPE_TOKENS, &[], "qwen2");
    let im_end = BPE_TOKENS.iter().position(|t| t.0 == "<|im_end|>").unwrap() as u32;
    let eot = BPE_TOKENS
        .iter()
        .position(|t| t.0 == "<|endoftext|>")
        .unwrap() as u32;
    w.set("tokenizer.ggml.eos_token_id", Value::U32(im_end));
    let tok = load(&w).unwrap();
    assert_eq!(tok.eos(), Some(im_end));
    assert!(tok.is_eog(im_end));
    assert!(tok.is_eog(eot));
    assert!(!tok.is_eog(tok.token_id("a").unwrap()));
    assert_eq!(tok.eog_ids(), &[im_end, eot]);
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let tok = load(&bpe_writer(BPE_TOKENS, &[], "qwen2")).unwrap();
    let [a, c3, a9, ctrl] = [
        tok.token_id("a").unwrap(),
        tok.token_id("Ã").unwrap(),
        tok.token_id("©").unwrap(),
        tok.token_id("<|x|>").unwrap(),
    ];
    // "é" is 0xC3 0xA9, one byte per token here.
    assert_eq!(tok.encode("é", Encode::TEXT).unwrap(), vec![c3, a9]);
    let mut s = StreamDecoder::new(&tok);
    assert_eq!(s.push(a), "a");
    assert_eq!(s.push(c3), "");
    assert_eq!(s.pending_bytes(), &[0xC3]);
    assert_eq!(s.push(ctrl), "", "control tokens are not rendered");
    assert_eq!(s.push(a9), "é");
    assert_eq!(s.flush(), "");
    // An unfinished character at the end comes out lossily.
    assert_eq!(s.push(c3), "");
    assert_eq!(s.flush(), "\u{FFFD}");
    // A byte that can never start a character is not held back.
    assert_eq!(s.push(a9), "\u{FFFD}");
    assert_eq!(s.push(a), "a");
}

#[test]
fn unknown_pre_tokenizer_is_an_error_naming_the_supported_ones() {
    let err = load(&bpe_writer(BPE_TOKENS, &[], "bogus-pre")).unwrap_err();
    assert!(
        matches!(err, TokenizerError::UnknownPreTokenizer { .. }),
        "{err}"
    );
    let msg = err.to_string();
    for name in [
        "bogus-pre",
        "tokenizer.ggml.pre",
        "qwen2",
        "smollm",
        "llama-bpe",
        "gpt-2",
        "default",
    ] {
        assert!(msg.contains(name), "{msg:?} should mention {name}");
    }
}

#[test]
fn missing_keys_are_named() {
    let err = load(&GgufWriter::new()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");

    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    let err = load(&w).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");

    w.set("tokenizer.ggml.tokens", strs(&["a", "b"]));
    let err = load(&w).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("bert".into()));
    let err = load(&w).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel(_)), "{err}");
}

#[test]
fn malformed_metadata_is_an_error_not_a_panic() {
    let mut w = bpe_writer(BPE_TOKENS, &[], "qwen2");
    w.set(
        "tokenizer.ggml.token_type",
        array(ValueType::I32, vec![Value::I32(1)]),
    );
    let err = load(&w).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.ggml.token_type"),
        "{err}"
    );

    let mut w = bpe_writer(BPE_TOKENS, &[], "qwen2");
    w.set("tokenizer.ggml.pre", Value::U32(3));
    assert!(load(&w).is_err());

    // add_bos_token without a usable BOS id.
    let mut w = bpe_writer(BPE_TOKENS, &[], "qwen2");
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(10_000));
    // Out-of-range ids fall back to the default (11, which exists here), as llama.cpp does.
    assert_eq!(load(&w).unwrap().bos(), Some(11));
    // With fewer than 12 tokens the default does not exist either: an error naming both keys.
    let mut w = bpe_writer(&BPE_TOKENS[..5], &[], "qwen2");
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    let err = load(&w).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.ggml.add_bos_token") && msg.contains("tokenizer.ggml.bos_token_id"),
        "{msg}"
    );
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tok = load(&bpe_writer(BPE_TOKENS, &[], "qwen2")).unwrap();
    let err = tok.decode(&[0, 9999]).unwrap_err();
    assert!(
        matches!(err, TokenizerError::TokenIdOutOfRange { id: 9999, .. }),
        "{err}"
    );
    assert_eq!(tok.token_piece_bytes(9999), None);
}

#[test]
fn tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}

/// A metadata array of one element type.
fn array(ty: ValueType, values: Vec<Value>) -> Value {
    Value::array(ty, values).expect("one element type")
}
