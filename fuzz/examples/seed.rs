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

    // chat_template: template source, then optionally \0 and a JSON array of messages.
    let c = root.join("chat_template");
    let conversation = br#"[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"add","arguments":{"a":1}}}]},{"role":"tool","tool_call_id":"c1","content":"2"},{"role":"user","content":"\u00e9\n"}]"#;
    let models = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cache/edgelm/models"))
        .and_then(|d| std::fs::read_dir(d).ok());
    for entry in models.into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        let Ok(file) = edgelm_gguf::GgufFile::open(&path) else {
            continue;
        };
        if let Some(src) = file.get_str("tokenizer.chat_template") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            put(&c, &stem, src.as_bytes());
            let mut with = src.as_bytes().to_vec();
            with.push(0);
            with.extend_from_slice(conversation);
            put(&c, &format!("{stem}-conversation"), &with);
        }
    }
    let templates: &[(&str, &str)] = &[
        ("chatml", edgelm_chat::CHATML_TEMPLATE),
        ("plain", "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"),
        ("raise", "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"),
        ("tojson", "{{ tools | tojson(indent=2, sort_keys=true) }}{{ messages | map('tojson', ensure_ascii=True) | join(',') }}"),
        ("macro", "{% macro f(x) %}{% if x > 0 %}{{ f(x - 1) }}{% endif %}{{ x }}{% endmacro %}{{ f(5) }}"),
        ("namespace", "{% set ns = namespace(n=0) %}{% for m in messages|reverse %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ strftime_now('%Y-%m-%d') }}"),
        ("python", "{% for m in messages %}{{ m.content.strip().split('\n')|join('|') if m.content is string }}{% for k, v in m.items() %}{{ k }}{% endfor %}{% endfor %}"),
        ("generation", "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% raw %}\n{{ x }}{% endraw %}{% endfor %}"),
        ("loop", "{% for i in range(1000) %}{% for j in range(1000) %}{{ i * j }}{% endfor %}{% endfor %}"),
        ("broken", "{% for m in messages %}{{ m.content "),
    ];
    for (name, src) in templates {
        put(&c, name, src.as_bytes());
    }
    let mut with = b"{{ messages | tojson }}\0".to_vec();
    with.extend_from_slice(conversation);
    put(&c, "json-conversation", &with);

    // serve_request: [endpoint selector: 0 chat, 1 completion] then the body.
    let r = root.join("serve_request");
    let bodies: &[(&str, u8, &str)] = &[
        (
            "chat-min",
            0,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "chat-full",
            0,
            r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stream_options":{"include_usage":true},"n":2,"logprobs":true,"top_logprobs":5,"logit_bias":{"15":-100,"42":2.5},"stop":["\n","END"],"max_completion_tokens":64,"temperature":0.7,"top_p":0.9,"top_k":40,"min_p":0.05,"repeat_penalty":1.1,"frequency_penalty":0.5,"presence_penalty":-0.5,"seed":-1,"response_format":{"type":"text"}}"#,
        ),
        (
            "chat-tools",
            0,
            r#"{"messages":[{"role":"user","content":"add"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"add","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"3"}],"tools":[{"type":"function","function":{"name":"add","parameters":{"type":"object"}}}],"max_tokens":8}"#,
        ),
        (
            "completion-text",
            1,
            r#"{"prompt":"Once upon a time","max_tokens":16,"stop":"\n","echo":true,"logprobs":3,"best_of":1,"suffix":""}"#,
        ),
        (
            "completion-tokens",
            1,
            r#"{"prompt":[[1,2,3]],"n":3,"stream":true,"seed":18446744073709551615}"#,
        ),
        (
            "completion-list",
            1,
            r#"{"prompt":["one"],"temperature":0}"#,
        ),
        (
            "bad-json",
            0,
            r#"{"messages":[{"role":"user","content":"hi"}"#,
        ),
        ("bad-not-object", 1, r#"["prompt"]"#),
        ("bad-messages", 0, r#"{"messages":[1,"x"],"n":0}"#),
        (
            "bad-ranges",
            0,
            r#"{"messages":[{}],"temperature":3,"top_logprobs":50,"logit_bias":{"x":1000},"stop":["",""]}"#,
        ),
        (
            "bad-prompt",
            1,
            r#"{"prompt":[-1,1e99],"suffix":"x","best_of":2}"#,
        ),
        (
            "bad-format",
            0,
            r#"{"messages":[{"role":"user"}],"response_format":{"type":"json_object"},"stream_options":{"include_usage":1}}"#,
        ),
    ];
    for (name, selector, body) in bodies {
        let mut bytes = vec![*selector];
        bytes.extend_from_slice(body.as_bytes());
        put(&r, name, &bytes);
    }

    // tool_calls: [chunk length selector] then model output in the syntaxes the parsers read.
    let t = root.join("tool_calls");
    let outputs: &[(&str, &str)] = &[
        ("hermes", "Sure.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>"),
        ("hermes-fenced", "```json\n{\"name\": \"f\", \"arguments\": {\"s\": \"}\\\"{\"}}\n```"),
        ("llama3", "{\"name\": \"f\", \"parameters\": {\"a\": [1, 2]}}; {\"name\": \"g\", \"parameters\": {}}"),
        ("python-tag", "<|python_tag|>brave_search.call(query=\"rust\", n=3)"),
        ("mistral", "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\": null}, \"id\": \"abc123def\"}]"),
        ("mistral-args", "[TOOL_CALLS]f[CALL_ID]a1b2c3[ARGS]{\"x\": 1}[TOOL_CALLS]g[ARGS]{}"),
        ("generic", "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}]}"),
        ("truncated", "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": "),
    ];
    for (i, (name, text)) in outputs.iter().enumerate() {
        let mut bytes = vec![i as u8 * 3];
        bytes.extend_from_slice(text.as_bytes());
        put(&t, name, &bytes);
    }

    // kv_state: [type selector] then a state in `KvCache::save_state`'s layout for the fuzz
    // target's model (block 4; a full layer of 2 kv heads, a window-6 layer of 1; heads of 4
    // values, or 32 for the quantized selector 2: q8_0 keys, q4_0 values, both rotated).
    let k = root.join("kv_state");
    let state = |sel: u8, n: usize, window_first: usize| {
        let (codes, head) = if sel == 2 { ([2u8, 3, 3], 32) } else { ([sel, sel, 0], 4) };
        // Bytes of `d` keys then `d` values.
        let row = |d: usize| match sel {
            0 => 8 * d,
            1 => 4 * d,
            _ => d / 32 * (34 + 18),
        };
        let mut s = codes.to_vec();
        s.extend_from_slice(&4u32.to_le_bytes());
        s.extend_from_slice(&(n as u64).to_le_bytes());
        for t in 0..n as u32 {
            s.extend_from_slice(&(t % 32).to_le_bytes());
        }
        s.extend_from_slice(&2u32.to_le_bytes());
        let layers = [(u64::MAX, 2 * head, 0usize), (6, head, window_first)];
        for (window, dim, first) in layers {
            s.extend_from_slice(&window.to_le_bytes());
            s.extend_from_slice(&1u32.to_le_bytes());
            s.extend_from_slice(&(dim as u32).to_le_bytes());
            s.extend_from_slice(&(first as u64).to_le_bytes());
        }
        for (_, dim, first) in layers {
            for (i, _) in (first..n).enumerate() {
                for j in 0..row(dim) {
                    s.push(((i * 7 + j) % 251) as u8 & if sel == 1 { 0x3b } else { 0x3f });
                }
            }
        }
        s
    };
    for (name, sel, n, first) in [
        ("f32-short", 0u8, 5, 0),
        ("f16-long", 1, 21, 12),
        ("empty", 1, 0, 0),
        ("quantized", 2, 13, 8),
    ] {
        let mut bytes = vec![sel];
        bytes.extend_from_slice(&state(sel, n, first));
        put(&k, name, &bytes);
    }

    // imatrix_parse: one importance matrix in each of llama.cpp's formats.
    let mut m = edgelm_compress::imatrix::Imatrix {
        datasets: vec!["calibration.txt".into()],
        chunk_count: 2,
        chunk_size: 4,
        ..Default::default()
    };
    m.accumulate("blk.0.attn_q.weight", &[1.0, -2.0, 0.5, 3.0, 0.0, 1.0], 3, 2);
    m.accumulate("blk.0.ffn_down.weight", &[0.25; 8], 4, 2);
    let im = root.join("imatrix_parse");
    put(&im, "legacy.dat", &m.to_legacy());
    put(&im, "imatrix.gguf", &m.to_gguf().expect("imatrix GGUF").to_bytes());

    // repack_index: a cache of one 18-byte weight, as `repack_cache` writes it.
    let mut cache = b"EDGELMRP".to_vec();
    cache.extend_from_slice(&edgelm_kernels_layout_version().to_le_bytes());
    cache.extend_from_slice(&1u32.to_le_bytes());
    cache.extend_from_slice(&0x0123_4567_89AB_CDEFu64.to_le_bytes());
    let name = b"blk.0.attn_q.weight";
    cache.extend_from_slice(&(name.len() as u32).to_le_bytes());
    cache.extend_from_slice(name);
    cache.extend_from_slice(&2u32.to_le_bytes());
    for v in [1u64, 32, 128, 18] {
        cache.extend_from_slice(&v.to_le_bytes());
    }
    cache.resize(128 + 18, 0x5A);
    put(&root.join("repack_index"), "one_weight.bin", &cache);
}

/// The repack cache layout version the seed is written for (`interleave::LAYOUT_VERSION`).
fn edgelm_kernels_layout_version() -> u32 {
    1
}
