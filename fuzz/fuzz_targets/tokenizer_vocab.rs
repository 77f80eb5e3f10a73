//! Structure-aware companion of `tokenizer_from_gguf`: the input is turned into a *valid* GGUF of
//! tokenizer metadata (vocabulary, token types, scores, merges, pre-tokenizer, special ids, flags),
//! so the fuzzer explores the tokenizer's loading and encoding logic instead of the GGUF framing.
//!
//! Input layout: byte 0 = flags; the rest, as lossy UTF-8, is cut at U+0001 into
//! `tokens (NUL-separated) | token types (one char each, code % 8: '1' normal, '2' unknown,
//! '3' control, '4' user-defined, '6' byte) | merges (NUL-separated) | text`.
#![no_main]

use edgelm_gguf::{GgufFile, GgufWriter, Value, ValueType};
use edgelm_tokenizer::{StreamDecoder, Tokenizer, TokenizerError, Encode};
use libfuzzer_sys::fuzz_target;

const PRES: &[&str] = &[
    "qwen2",
    "llama-bpe",
    "default",
    "gpt-2",
    "smollm",
    "falcon",
    "starcoder",
    "dbrx",
];

fn strs(v: impl IntoIterator<Item = String>) -> Value {
    array(
        ValueType::String,
        v.into_iter().map(Value::String).collect(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let spm = flags & 1 == 0;
    let with_bytes = flags & 0x80 != 0;
    let rest = String::from_utf8_lossy(rest);
    let mut parts = rest.split('\u{1}');
    let mut tokens: Vec<String> = parts
        .next()
        .unwrap_or("")
        .split('\0')
        .map(str::to_owned)
        .collect();
    let types: Vec<char> = parts.next().unwrap_or("").chars().collect();
    let merges: Vec<String> = parts
        .next()
        .unwrap_or("")
        .split('\0')
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    let text = parts.next().unwrap_or("");

    let n_fuzzed = tokens.len();
    if with_bytes {
        if spm {
            tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        } else {
            tokens.extend(edgelm_fuzz::gpt2_byte_chars().iter().map(|c| c.to_string()));
        }
    }
    let token_types: Vec<i32> = (0..tokens.len())
        .map(|i| match types.get(i) {
            Some(&c) => (c as u32 % 8) as i32,
            None if i >= n_fuzzed && spm => edgelm_fuzz::BYTE,
            None => edgelm_fuzz::NORMAL,
        })
        .collect();
    // Scores from the text (longer pieces score higher), with a few non-finite values.
    let scores: Vec<f32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match t.bytes().next() {
            Some(b'N') => f32::NAN,
            Some(b'I') => f32::NEG_INFINITY,
            _ => t.chars().count() as f32 - (i % 7) as f32 * 0.25,
        })
        .collect();

    let mut w = GgufWriter::new();
    let model = if spm { "llama" } else { "gpt2" };
    w.set("tokenizer.ggml.model", Value::String(model.into()));
    w.set("tokenizer.ggml.tokens", strs(tokens.iter().cloned()));
    w.set(
        "tokenizer.ggml.token_type",
        array(
            ValueType::I32,
            token_types.into_iter().map(Value::I32).collect(),
        ),
    );
    if flags & 0x40 != 0 {
        w.set(
            "tokenizer.ggml.scores",
            array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
        );
    }
    if !spm || flags & 0x20 != 0 {
        w.set("tokenizer.ggml.merges", strs(merges));
    }
    let pre = PRES[(flags as usize >> 1) % PRES.len()];
    w.set("tokenizer.ggml.pre", Value::String(pre.into()));
    w.set(
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(flags & 0x10 != 0),
    );
    w.set(
        "tokenizer.ggml.add_bos_token",
        Value::Bool(flags & 0x08 != 0),
    );
    w.set(
        "tokenizer.ggml.add_eos_token",
        Value::Bool(flags & 0x04 != 0),
    );
    // Special ids picked by the first token types (may be out of range: must be ignored).
    let id = |k: usize| types.get(k).map_or(0, |&c| c as u32 % 300);
    w.set("tokenizer.ggml.bos_token_id", Value::U32(id(0)));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(id(1)));
    w.set("tokenizer.ggml.eot_token_id", Value::U32(id(2)));
    w.set("tokenizer.ggml.fim_pad_token_id", Value::U32(id(3)));

    let file = GgufFile::from_bytes(w.to_bytes()).expect("writer output parses");
    let tok = match Tokenizer::from_gguf(&file) {
        Ok(t) => t,
        Err(_) => return,
    };
    let n = tok.vocab_size();
    for &e in tok.eog_ids() {
        assert!((e as usize) < n);
    }
    // The fuzzed text and a few fixed ones (each run builds a tokenizer, which is the slow part).
    let fixed = &edgelm_fuzz::FIXED_TEXTS;
    for t in [text, fixed[3], fixed[6], fixed[7]] {
        for add_special in [false, true] {
            for parse_special in [false, true] {
                let ids = match tok.encode(t, Encode { add_special, parse_special }) {
                    Ok(ids) => ids,
                    // Possible for SentencePiece only without byte tokens.
                    Err(TokenizerError::NoByteToken { .. }) if !with_bytes => continue,
                    Err(TokenizerError::MissingSpecialToken { .. }) => continue,
                    Err(e) => panic!("encode {t:?}: {e}"),
                };
                for &i in &ids {
                    assert!((i as usize) < n, "id {i} outside vocabulary of {n}");
                }
                tok.decode(&ids).expect("ids from encode decode");
                let mut s = StreamDecoder::new(&tok);
                let mut out: String = ids.iter().map(|&i| s.push(i)).collect();
                out.push_str(&s.flush());
            }
        }
    }
});

/// A metadata array of one element type.
fn array(ty: ValueType, values: Vec<Value>) -> Value {
    Value::array(ty, values).expect("one element type")
}
