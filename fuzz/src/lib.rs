//! Small valid GGUF files for the fuzz targets: the tokenizers `tokenizer_encode` builds once, and
//! the seed corpus `examples/seed.rs` writes (see `seed.sh`).

use edgelm_gguf::{GgmlType, GgufWriter, Value, ValueType};

// GGUF token types.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER: i32 = 4;
pub const BYTE: i32 = 6;

/// Special tokens shared by both vocabularies: control tokens (cut out only with
/// `parse_special`), one pair overlapping so the longest-first rule matters, and user-defined
/// tokens (always cut out).
const SPECIALS: &[(&str, i32)] = &[
    ("<|im_start|>", CONTROL),
    ("<|im_end|>", CONTROL),
    ("<|endoftext|>", CONTROL),
    ("<|x|>", CONTROL),
    ("<|x|>c", CONTROL),
    ("<tool>", USER),
    ("\n\n", USER),
];

/// Texts every target encodes: special-looking text, byte-token spellings, emoji, combining
/// marks, the SentencePiece space mark, control characters.
pub const FIXED_TEXTS: &[&str] = &[
    "",
    " ",
    "Hello, world! It's 2024.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_start|>|><|<|im_end|",
    "<0x41><0x0A><0xZZ><0x",
    "<s></s><unk><tool>\n\n<|x|>c<|x|>",
    "😀👍🏽👨‍👩‍👧 e\u{301} ﷽",
    "\u{2581}a\u{2581}\u{2581}b ▁",
    "\0\t\r\n\u{7f}\u{80}\u{ffff}\u{10ffff}",
    "   leading and trailing   ",
    "'s 're 've 'm 'll 'd ABC'S 123456789",
    "\u{FFFD}\u{FEFF}x",
];

fn strs<S: AsRef<str>>(v: impl IntoIterator<Item = S>) -> Value {
    array(
        ValueType::String,
        v.into_iter()
            .map(|s| Value::String(s.as_ref().to_owned()))
            .collect(),
    )
}

fn i32s(v: impl IntoIterator<Item = i32>) -> Value {
    array(ValueType::I32, v.into_iter().map(Value::I32).collect())
}

fn f32s(v: impl IntoIterator<Item = f32>) -> Value {
    array(ValueType::F32, v.into_iter().map(Value::F32).collect())
}

/// A SentencePiece vocabulary: `<unk> <s> </s>`, the 256 `<0xNN>` byte tokens, scored pieces, and
/// the special tokens. `add_space_prefix` as given.
pub fn spm_vocab(add_space_prefix: bool) -> GgufWriter {
    let mut texts: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0.0f32; 3];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for b in 0..=255u8 {
        texts.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(BYTE);
    }
    let pieces: &[(&str, f32)] = &[
        ("\u{2581}", -1.0),
        ("a", -3.0),
        ("b", -3.0),
        ("c", -3.0),
        ("t", -3.5),
        ("h", -3.5),
        ("e", -3.0),
        ("l", -3.5),
        ("o", -3.5),
        ("ab", -2.0),
        ("bc", -1.5),
        ("abc", -1.0),
        ("\u{2581}a", -2.5),
        ("th", -2.0),
        ("he", -2.0),
        ("the", -1.0),
        ("\u{2581}the", -0.5),
        ("ll", -2.2),
        ("llo", -2.1),
        ("hello", -0.7),
        ("é", -4.0),
        ("😀", -4.0),
        ("\u{2581}\u{2581}", -2.0),
        ("-0", -0.0),
        ("nan", f32::NAN),
        ("inf", f32::INFINITY),
    ];
    for &(t, s) in pieces {
        texts.push(t.into());
        scores.push(s);
        types.push(NORMAL);
    }
    for &(t, ty) in SPECIALS {
        texts.push(t.into());
        scores.push(0.0);
        types.push(ty);
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set("tokenizer.ggml.tokens", strs(&texts));
    w.set("tokenizer.ggml.scores", f32s(scores));
    w.set("tokenizer.ggml.token_type", i32s(types));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set(
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(add_space_prefix),
    );
    w
}

/// GPT-2's byte-to-character table (printable Latin-1 maps to itself, the rest to U+0100..).
pub fn gpt2_byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *slot = if printable {
            b as u8 as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// A byte-level BPE vocabulary in which every byte is a token and every merge result is a
/// vocabulary entry, so every text is representable; plus the special tokens.
pub fn bpe_vocab(pre: &str) -> GgufWriter {
    let byte_chars = gpt2_byte_chars();
    let mut tokens: Vec<(String, i32)> =
        byte_chars.iter().map(|c| (c.to_string(), NORMAL)).collect();
    // Merges in rank order; each result is added to the vocabulary.
    let merges: &[(&str, &str)] = &[
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("a", "b"),
        ("b", "c"),
        ("ab", "c"),
        ("l", "l"),
        ("ll", "o"),
        ("he", "llo"),
        ("Ã", "©"),
        ("ð", "Ł"),
        ("ðŁ", "ĺ"),
        ("Ċ", "Ċ"),
        ("Ġ", "Ġ"),
        ("ĠĠ", "ĠĠ"),
        ("1", "2"),
        ("12", "3"),
        ("'", "s"),
        ("<", "|"),
        ("|", ">"),
    ];
    for (l, r) in merges {
        tokens.push((format!("{l}{r}"), NORMAL));
    }
    for &(t, ty) in SPECIALS {
        tokens.push((t.into(), ty));
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("qwen2".into()));
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String(pre.into()));
    w.set("tokenizer.ggml.tokens", strs(tokens.iter().map(|t| &t.0)));
    w.set(
        "tokenizer.ggml.token_type",
        i32s(tokens.iter().map(|t| t.1)),
    );
    w.set(
        "tokenizer.ggml.merges",
        strs(merges.iter().map(|(l, r)| format!("{l} {r}"))),
    );
    let id = |s: &str| tokens.iter().position(|t| t.0 == s).unwrap() as u32;
    w.set("tokenizer.ggml.eos_token_id", Value::U32(id("<|im_end|>")));
    w.set(
        "tokenizer.ggml.bos_token_id",
        Value::U32(id("<|endoftext|>")),
    );
    w.set(
        "tokenizer.chat_template",
        Value::String(
            "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}".into(),
        ),
    );
    w
}

/// A small model-like file: every tensor type, odd metadata types, custom alignment.
pub fn tensors_file() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.alignment", Value::U32(64));
    w.set("llama.block_count", Value::U32(1));
    w.set("i8", Value::I8(-1));
    w.set("u16", Value::U16(7));
    w.set("i64", Value::I64(-5));
    w.set("f64", Value::F64(0.25));
    w.set("bool", Value::Bool(true));
    w.set(
        "nested",
        array(
            ValueType::Array,
            vec![array(
                ValueType::U8,
                vec![Value::U8(1), Value::U8(2)],
            )],
        ),
    );
    w.set("empty", array(ValueType::U64, vec![]));
    for (i, &ty) in GgmlType::ALL.iter().enumerate() {
        let n = ty.block_elems() as u64;
        let bytes = ty.bytes_for(n).unwrap() as usize;
        let data = (0..bytes).map(|j| (j * 31 + i * 7) as u8).collect();
        w.add_tensor(&format!("t.{ty}"), &[n, 1], ty, data).unwrap();
    }
    w.add_f32("w", &[2, 2], &[1.0, -2.0, f32::NAN, f32::INFINITY])
        .unwrap();
    w
}

/// A metadata array of one element type.
fn array(ty: ValueType, values: Vec<Value>) -> Value {
    Value::array(ty, values).expect("one element type")
}
