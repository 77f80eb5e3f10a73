//! Constraints on a tiny SentencePiece vocabulary written with the project's GGUF writer: bytes,
//! a few multi-byte pieces (so tokens span grammar lexemes), and `</s>` as end of sequence. No
//! two tokens share their bytes: llguidance's mask names one token per byte string, while
//! `allows` accepts any spelling.

use super::*;
use edgelm_chat::tools::ToolCallFormat;
use edgelm_gguf::{GgufFile, GgufWriter, Value as GValue, ValueType};
use edgelm_tokenizer::Encode;

const PIECES: &[&str] = &[
    "{\"",
    "\": ",
    "\", \"",
    "\"}",
    "true",
    "false",
    "null",
    "12",
    "<tool_call>",
    "name",
    "}\n",
    "[TOOL_CALLS]",
];

fn tokenizer() -> Arc<Tokenizer> {
    let mut texts: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        texts.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for p in PIECES {
        texts.push((*p).to_owned());
        types.push(match *p {
            "<tool_call>" => 4,
            "[TOOL_CALLS]" => 3,
            _ => 1,
        });
    }
    let scores = vec![0.0f32; texts.len()];
    let array = |ty, values| GValue::array(ty, values).expect("one element type");
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", GValue::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        array(
            ValueType::String,
            texts.into_iter().map(GValue::String).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.scores",
        array(
            ValueType::F32,
            scores.into_iter().map(GValue::F32).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        array(ValueType::I32, types.into_iter().map(GValue::I32).collect()),
    );
    w.set("tokenizer.ggml.bos_token_id", GValue::U32(1));
    w.set("tokenizer.ggml.eos_token_id", GValue::U32(2));
    w.set("tokenizer.ggml.add_space_prefix", GValue::Bool(false));
    let file = GgufFile::from_bytes(w.to_bytes()).expect("a valid GGUF");
    Arc::new(Tokenizer::from_gguf(&file).expect("a valid vocabulary"))
}

/// xorshift: logits that favour no grammar in particular.
struct Noise(u64);
impl Noise {
    fn logits(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % 1000) as f32 / 100.0
            })
            .collect()
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Drive `guide` with noisy logits as the scheduler does (draw unmasked, mask only on a
/// rejection) until it ends; the text produced.
fn generate(tok: &Tokenizer, guide: &mut Guide, seed: u64, max: usize) -> (String, bool) {
    let mut noise = Noise(seed);
    let mut ids = Vec::new();
    // A triggered grammar ends when it switches off again.
    let was_active = guide.is_active();
    for _ in 0..max {
        if was_active && !guide.is_active() {
            return (tok.decode(&ids).expect("decode"), true);
        }
        let mut logits = noise.logits(tok.vocab_size());
        let mut t = argmax(&logits);
        if !guide.allows(t) {
            assert!(guide.mask(&mut logits).expect("mask") > 0, "grammar stuck");
            t = argmax(&logits);
            assert!(guide.allows(t), "the mask allowed a token `allows` refuses");
        }
        if tok.is_eog(t) {
            return (tok.decode(&ids).expect("decode"), true);
        }
        let piece = tok.token_piece_bytes_special(t).expect("in vocab").to_vec();
        guide.commit(t, &piece).expect("an allowed token commits");
        ids.push(t);
        if guide.is_complete() {
            return (tok.decode(&ids).expect("decode"), true);
        }
    }
    (tok.decode(&ids).expect("decode"), false)
}

#[test]
fn json_schema_output_validates_whatever_the_logits() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(tok.clone()).expect("compiler");
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "tag": {"enum": ["a", "bc"]}
        },
        "required": ["ok", "n", "tag"],
        "additionalProperties": false
    });
    let c = compiler
        .compile(&GrammarSpec::JsonSchema(schema))
        .expect("compiles");
    for seed in 1..20 {
        let mut g = Guide::new(c.clone(), None);
        let (text, ended) = generate(&tok, &mut g, seed, 200);
        assert!(ended, "no end after 200 tokens: {text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let n = v["n"].as_i64().expect("n is an integer");
        assert!((0..=99).contains(&n), "{text}");
        assert!(v["ok"].is_boolean(), "{text}");
        assert!(v["tag"] == "a" || v["tag"] == "bc", "{text}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{text}");
    }
}

#[test]
fn mask_and_allows_agree() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(tok.clone()).expect("compiler");
    let mut c = compiler
        .compile(&GrammarSpec::JsonObject)
        .expect("compiles");
    // `{"a": tr`, spelled with the vocabulary's pieces and bytes.
    let byte = |b: u8| format!("<0x{b:02X}>");
    let prefix: Vec<u32> = [
        "{\"".to_owned(),
        byte(b'a'),
        "\": ".to_owned(),
        byte(b't'),
        byte(b'r'),
    ]
    .iter()
    .map(|p| tok.token_id(p).expect("in vocab"))
    .collect();
    for (i, &t) in prefix.iter().enumerate() {
        let mut logits = vec![0.0; tok.vocab_size()];
        c.mask(&mut logits).expect("mask");
        for id in 0..tok.vocab_size() as u32 {
            assert_eq!(
                c.allows(id),
                logits[id as usize].is_finite(),
                "token {id} after {i} tokens"
            );
        }
        c.commit(t).expect("prefix is valid JSON so far");
    }
    assert!(!c.allows(2), "end of sequence inside an object");
}

#[test]
fn bad_schemas_are_refused_with_the_reason() {
    let compiler = GrammarCompiler::new(tokenizer()).expect("compiler");
    for schema in [
        json!({"type": "nonsense"}),
        json!("a string"),
        json!({"$ref": "#/$defs/missing"}),
        json!({"type": "integer", "minimum": 5, "maximum": 1}),
    ] {
        match compiler.compile(&GrammarSpec::JsonSchema(schema.clone())) {
            Err(GrammarError::Compile(msg)) => assert!(!msg.is_empty()),
            other => panic!("{schema} gave {other:?}"),
        }
    }
}

#[test]
fn a_triggered_grammar_holds_only_from_the_trigger_to_its_end() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(tok.clone()).expect("compiler");
    let tools = [
        json!({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "maximum": 1000}},
        "required": ["x"], "additionalProperties": false}}}),
    ];
    let tg = tool_call_grammar(ToolCallFormat::Hermes, &tools, &ToolChoice::Auto, None)
        .expect("builds")
        .expect("hermes triggers on its marker");
    let c = compiler.compile(&tg.spec).expect("compiles");
    let mut g = Guide::new(c, tg.trigger);
    for t in tok.encode("Hi <tool_call>", Encode::TEXT).expect("encode") {
        assert!(!g.is_active());
        assert!(g.allows(t));
        g.commit(t, tok.token_piece_bytes_special(t).expect("in vocab"))
            .expect("free text");
    }
    assert!(g.is_active(), "the marker switches the grammar on");
    let (body, ended) = generate(&tok, &mut g, 7, 300);
    assert!(ended && !g.is_active(), "the call never closed: {body:?}");
    let call = body
        .strip_prefix('\n')
        .and_then(|b| b.strip_suffix("\n</tool_call>"))
        .unwrap_or_else(|| panic!("not a call: {body:?}"));
    let v: Value = serde_json::from_str(call).expect("arguments are JSON");
    assert_eq!(v["name"], "f");
    assert!(v["arguments"]["x"].is_i64(), "{call}");
}

#[test]
fn tool_grammars_compile_for_every_syntax_and_choice() {
    let compiler = GrammarCompiler::new(tokenizer()).expect("compiler");
    let tools = [
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
        json!({"type": "function", "function": {"name": "now"}}),
    ];
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3,
        ToolCallFormat::Mistral,
        ToolCallFormat::Generic,
    ] {
        for choice in [
            ToolChoice::Auto,
            ToolChoice::Required,
            ToolChoice::Function("now".into()),
        ] {
            if let Some(g) = tool_call_grammar(format, &tools, &choice, None).expect("builds") {
                compiler
                    .compile(&g.spec)
                    .unwrap_or_else(|e| panic!("{format:?} {choice:?}: {e}"));
            }
        }
    }
    let err = tool_call_grammar(
        ToolCallFormat::Hermes,
        &tools,
        &ToolChoice::Function("missing".into()),
        None,
    );
    assert!(matches!(err, Err(GrammarError::Compile(m)) if m.contains("missing")));
}

#[test]
fn a_named_call_in_the_generic_syntax_is_valid_json() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(tok.clone()).expect("compiler");
    let tools = [
        json!({"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["utc", "local"]}},
        "additionalProperties": false}}}),
    ];
    let g = tool_call_grammar(
        ToolCallFormat::Generic,
        &tools,
        &ToolChoice::Function("now".into()),
        None,
    )
    .expect("builds")
    .expect("generic has a grammar when forced");
    let mut guide = Guide::new(compiler.compile(&g.spec).expect("compiles"), g.trigger);
    let (text, ended) = generate(&tok, &mut guide, 3, 200);
    assert!(ended, "{text:?}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["tool_calls"][0]["name"], "now", "{text}");
    assert!(v["tool_calls"][0]["arguments"].is_object(), "{text}");
}

#[test]
fn a_marker_held_as_a_control_token_is_named_by_the_grammar() {
    let tok = tokenizer();
    let marker = control_marker(&tok, ToolCallFormat::Mistral).expect("[TOOL_CALLS] is control");
    assert_eq!(
        control_marker(&tok, ToolCallFormat::Hermes),
        None,
        "<tool_call> is text"
    );
    let compiler = GrammarCompiler::new(tok.clone()).expect("compiler");
    let tools = [
        json!({"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": false}}}),
    ];
    let g = tool_call_grammar(
        ToolCallFormat::Mistral,
        &tools,
        &ToolChoice::Required,
        Some(marker),
    )
    .expect("builds")
    .expect("forced calls have a grammar");
    let mut c = compiler.compile(&g.spec).expect("compiles");
    let mut logits = vec![0.0; tok.vocab_size()];
    assert_eq!(
        c.mask(&mut logits).expect("mask"),
        1,
        "only the marker may open"
    );
    assert!(logits[marker as usize].is_finite());
    c.commit(marker).expect("the marker commits");
    let mut g = Guide::new(c, None);
    let (text, ended) = generate(&tok, &mut g, 5, 100);
    assert!(ended, "{text:?}");
    let v: Value = serde_json::from_str(&text).expect("a JSON array of calls");
    assert_eq!(v[0]["name"], "now", "{text}");
}
