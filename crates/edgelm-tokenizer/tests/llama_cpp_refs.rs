//! Compares against llama.cpp's outputs on the real models.
//!
//! Runs only when `EDGELM_TOKENIZER_MODELS_DIR` names a directory holding `qwen.gguf`,
//! `gemma.gguf` and `smollm.gguf`; the references are read from `EDGELM_TOKENIZER_REFS_DIR`
//! (default `/work/shared/refs`): `tokenize.jsonl`, `greedy.jsonl`, `gpl-3.txt`.

use edgelm_gguf::GgufFile;
use edgelm_tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

fn model_file(name: &str) -> &'static str {
    match name {
        "qwen2.5-coder-0.5b-instruct" => "qwen.gguf",
        "gemma3-270m" => "gemma.gguf",
        "smollm2-135m-instruct" => "smollm.gguf",
        other => panic!("reference names an unknown model {other:?}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn matches_llama_cpp_references() {
    let Some(models) = std::env::var_os("EDGELM_TOKENIZER_MODELS_DIR").map(PathBuf::from) else {
        eprintln!(
            "EDGELM_TOKENIZER_MODELS_DIR not set: skipping the llama.cpp reference comparison"
        );
        return;
    };
    let refs = std::env::var_os("EDGELM_TOKENIZER_REFS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/refs"));

    let mut toks: HashMap<String, Tokenizer> = HashMap::new();
    for name in [
        "qwen2.5-coder-0.5b-instruct",
        "gemma3-270m",
        "smollm2-135m-instruct",
    ] {
        let path = models.join(model_file(name));
        let t0 = Instant::now();
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{name}: loaded in {:?}: {tok:?}", t0.elapsed());
        toks.insert(name.to_owned(), tok);
    }

    let mut failures = Vec::new();
    let mut passed = 0;

    // tokenize.jsonl: text -> ids, add_special = parse_special = true.
    let lines = std::fs::read_to_string(refs.join("tokenize.jsonl")).expect("tokenize.jsonl");
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).expect("json line");
        let model = v["model"].as_str().expect("model");
        let text = v["text"].as_str().expect("text");
        let want = ids(&v["ids"]);
        let got = toks[model].encode(text, true, true).expect("encode");
        if got == want {
            passed += 1;
        } else {
            failures.push(format!(
                "tokenize {model} {text:?}\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }

    // greedy.jsonl: prompt -> prompt_ids; greedy_ids -> greedy_text (whole and streamed) and
    // greedy_pieces.
    let lines = std::fs::read_to_string(refs.join("greedy.jsonl")).expect("greedy.jsonl");
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).expect("json line");
        let model = v["model"].as_str().expect("model");
        let tok = &toks[model];
        let prompt = v["prompt"].as_str().expect("prompt");
        let want = ids(&v["prompt_ids"]);
        let got = tok.encode(prompt, true, true).expect("encode");
        if got == want {
            passed += 1;
        } else {
            failures.push(format!(
                "prompt {model} {prompt:?}\n  want {want:?}\n  got  {got:?}"
            ));
        }

        let greedy = ids(&v["greedy_ids"]);
        let want_text = v["greedy_text"].as_str().expect("greedy_text");
        let got_text = tok.decode(&greedy).expect("decode");
        if got_text == want_text {
            passed += 1;
        } else {
            failures.push(format!(
                "decode {model} {greedy:?}\n  want {want_text:?}\n  got  {got_text:?}"
            ));
        }

        let mut stream = StreamDecoder::new(tok);
        let mut streamed: String = greedy.iter().map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.flush());
        if streamed == want_text {
            passed += 1;
        } else {
            failures.push(format!(
                "stream {model}\n  want {want_text:?}\n  got  {streamed:?}"
            ));
        }

        if let Some(pieces) = v.get("greedy_pieces").and_then(Value::as_array) {
            for (&id, want) in greedy.iter().zip(pieces) {
                let want = want.as_str().expect("piece");
                let got = String::from_utf8_lossy(tok.token_piece_bytes(id).expect("in vocab"));
                if got == want {
                    passed += 1;
                } else {
                    failures.push(format!("piece {model} {id}: want {want:?} got {got:?}"));
                }
            }
        }
    }

    // A 35 KB text: fast, and decoding gives the text back.
    let gpl = std::fs::read_to_string(refs.join("gpl-3.txt")).expect("gpl-3.txt");
    for (name, tok) in &toks {
        let t0 = Instant::now();
        let encoded = tok.encode(&gpl, false, false).expect("encode gpl");
        let took = t0.elapsed();
        eprintln!(
            "{name}: gpl-3.txt ({} bytes) -> {} tokens in {took:?}",
            gpl.len(),
            encoded.len()
        );
        if !cfg!(debug_assertions) && took.as_secs_f64() > 0.5 {
            failures.push(format!("{name}: encoding gpl-3.txt took {took:?}"));
        }
        let decoded = tok.decode(&encoded).expect("decode gpl");
        if decoded == gpl {
            passed += 1;
        } else {
            failures.push(format!(
                "{name}: decode(encode(gpl-3.txt)) differs from the text"
            ));
        }
    }

    eprintln!("{passed} checks passed, {} failed", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
