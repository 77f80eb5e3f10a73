//! The `edgelm` binary end to end on the smallest real model: output formats, determinism, and
//! clear errors for bad input.

mod common;

use edgelm_tokenizer::Encode;
use std::process::{Command, Output};

const MODEL: &str = "smollm2-135m-instruct";

fn edgelm(args: &[&str]) -> Output {
    // Make sure the model is cached first so the commands below do not race to pull it.
    common::model_path(MODEL);
    Command::new(env!("CARGO_BIN_EXE_edgelm"))
        .args(args)
        .output()
        .expect("running edgelm")
}

/// `edgelm chat ARGS…` (the model is cached first) answering `input` piped to its stdin.
fn chat_piped<S: AsRef<std::ffi::OsStr>>(model: &str, args: &[S], input: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    common::model_path(model);
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgelm"))
        .args(["chat", "-m", model])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting edgelm chat");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("writing to edgelm chat");
    child.wait_with_output().expect("waiting for edgelm chat")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "edgelm failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

/// A greedy line where llama.cpp's choices equal the exact argmax at every step (on the others its
/// 8-bit noise flips a near-tie, and the precise path rightly follows the exact math).
fn agreeing_line() -> serde_json::Value {
    let prompt = "1, 2, 3, 4, 5,";
    common::jsonl("greedy.jsonl")
        .into_iter()
        .find(|l| l["model"] == MODEL && l["prompt"] == prompt)
        .unwrap()
}

#[test]
fn tokenize_prints_json_ids() {
    let line = common::jsonl("tokenize.jsonl")
        .into_iter()
        .find(|l| l["model"] == MODEL)
        .unwrap();
    let out = stdout(&edgelm(&[
        "tokenize",
        "-m",
        MODEL,
        "-p",
        line["text"].as_str().unwrap(),
    ]));
    let got: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got, common::ids(&line["ids"]));
}

#[test]
fn greedy_run_streams_llama_cpp_text_and_a_timing_line() {
    let line = agreeing_line();
    let o = edgelm(&[
        "run",
        "-m",
        MODEL,
        "-p",
        line["prompt"].as_str().unwrap(),
        "--raw",
        "--temp",
        "0",
        "-n",
        "12",
    ]);
    let text = stdout(&o);
    let pieces: String = line["greedy_pieces"].as_array().unwrap()[..12]
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(text.trim_end_matches('\n'), pieces);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tok/s") && err.contains("first token"),
        "timing line missing: {err}"
    );
}

#[test]
fn same_seed_same_text() {
    let args = [
        "run",
        "-m",
        MODEL,
        "-p",
        "Once upon a time",
        "--temp",
        "1.0",
        "--seed",
        "42",
        "-n",
        "16",
    ];
    let a = stdout(&edgelm(&args));
    assert_eq!(a, stdout(&edgelm(&args)));
    let mut other = args;
    other[8] = "43";
    assert_ne!(
        a,
        stdout(&edgelm(&other)),
        "a different seed should give different text"
    );
}

#[test]
fn stop_string_ends_output_before_it() {
    let line = agreeing_line();
    let full: String = line["greedy_pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let stop = &full[full.len() / 2..full.len() / 2 + 3];
    let text = stdout(&edgelm(&[
        "run",
        "-m",
        MODEL,
        "-p",
        line["prompt"].as_str().unwrap(),
        "--raw",
        "--temp",
        "0",
        "-n",
        "32",
        "--stop",
        stop,
    ]));
    let want = &full[..full.find(stop).unwrap()];
    assert_eq!(text.trim_end_matches('\n'), want);
}

#[test]
fn score_prints_one_json_line_per_position() {
    let out = stdout(&edgelm(&[
        "score",
        "-m",
        MODEL,
        "--ids",
        "504,3458,282,4649,314",
        "--top",
        "3",
    ]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[1]["pos"], 1);
    assert_eq!(lines[1]["next"], 282);
    assert!(lines[1]["logprob"].as_f64().unwrap() < 0.0);
    assert_eq!(lines[1]["top"].as_array().unwrap().len(), 3);
}

/// `embed` prints one JSON array per input (each non-empty line of -f, batched together), of
/// the model's width and unit length; a line gets the vector it gets alone with -p.
#[test]
fn embed_prints_one_unit_vector_per_input() {
    let dir = std::env::temp_dir().join(format!("edgelm-embed-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("inputs.txt");
    std::fs::write(
        &file,
        "The cat sat on the mat.\n\n  \nA cat was sitting on the mat.\r\n\
         Quarterly revenue rose 5% on strong sales.\n",
    )
    .unwrap();
    let parse = |out: String| -> Vec<Vec<f32>> {
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let v = parse(stdout(&edgelm(&[
        "embed",
        "-m",
        MODEL,
        "-f",
        file.to_str().unwrap(),
    ])));
    assert_eq!(v.len(), 3, "one line per non-empty input line");
    let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    for e in &v {
        assert_eq!(e.len(), 576, "SmolLM2-135M's hidden width");
        assert!((dot(e, e) - 1.0).abs() < 1e-4, "norm² {}", dot(e, e));
    }
    assert!(dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.05);
    let alone = parse(stdout(&edgelm(&[
        "embed",
        "-m",
        MODEL,
        "-p",
        "A cat was sitting on the mat.",
    ])));
    assert_eq!(alone.len(), 1);
    assert!(dot(&alone[0], &v[1]) > 1.0 - 1e-4);

    let o = edgelm(&["embed", "-m", MODEL, "-p", ""]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"));
    std::fs::write(&file, "\n  \n").unwrap();
    let o = edgelm(&["embed", "-m", MODEL, "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no text to embed"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn prompt_longer_than_context_is_an_error_naming_both_numbers() {
    let o = edgelm(&[
        "run",
        "-m",
        MODEL,
        "-p",
        "one two three four five six seven eight",
        "--ctx",
        "4",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("8 tokens") && err.contains("context length is 4"),
        "{err}"
    );
}

/// A full context stops generation, saying so; `--context-shift` goes on past it (here over a
/// quantized cache with rotated keys, re-rotated at every shift).
#[test]
fn context_shift_generates_past_a_full_context() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "-m",
            MODEL,
            "-p",
            "Count from one onwards:",
            "--raw",
            "--temp",
            "0",
            "--ignore-eos",
            "-n",
            "150",
            "--ctx",
            "64",
        ];
        args.extend_from_slice(extra);
        edgelm(&args)
    };
    let generated = |o: &Output| -> usize {
        let err = String::from_utf8_lossy(&o.stderr);
        let at = err.find("generated ").expect("timing line") + "generated ".len();
        err[at..].split(' ').next().unwrap().parse().unwrap()
    };
    let stopped = run(&[]);
    stdout(&stopped);
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        err.contains("is full") && err.contains("--context-shift"),
        "{err}"
    );
    assert!(generated(&stopped) < 64, "{err}");
    for extra in [
        &["--context-shift", "--keep", "4"][..],
        &[
            "--context-shift",
            "--ctk",
            "q8_0",
            "--ctv",
            "q4_0",
            "--kv-rotation",
            "all",
        ][..],
    ] {
        let shifted = run(extra);
        let text = stdout(&shifted);
        assert_eq!(generated(&shifted), 150, "{extra:?}: {text}");
        assert!(!String::from_utf8_lossy(&shifted.stderr).contains("is full"));
    }
}

/// `bench -d`: prompt and generation timed after tokens already in the cache, on a model whose
/// sliding windows release keys as it goes (every run continues the same filled context).
#[test]
fn bench_times_tests_at_depth() {
    let o = edgelm(&[
        "bench",
        "-m",
        "gemma3-270m",
        "-p",
        "16",
        "-n",
        "8",
        "-d",
        "0,600",
        "-r",
        "2",
        "-o",
        "json",
        "--bandwidth",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let tests: Vec<&str> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp16", "tg8", "pp16 @ d600", "tg8 @ d600"]);
    let file_bytes = std::fs::metadata(common::model_path("gemma3-270m"))
        .unwrap()
        .len();
    let count = |r: &serde_json::Value, key: &str| r[key].as_array().map(|v| v.len());
    for r in doc["results"].as_array().unwrap() {
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0, "{r}");
        if r["n_gen"].as_u64() == Some(0) {
            // Prompts are bound by arithmetic, not read against the bandwidth.
            assert_eq!(count(r, "read_gbps_samples"), None, "{r}");
            continue;
        }
        // A reading before each of the two runs and one after the last.
        assert_eq!(count(r, "read_gbps_samples"), Some(3), "{r}");
        assert_eq!(count(r, "bandwidth_share_samples"), Some(2), "{r}");
        for key in ["read_gbps_samples", "bandwidth_share_samples"] {
            assert!(
                r[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|v| v.as_f64().unwrap() > 0.0),
                "{r}"
            );
        }
        // Gemma 3 ties its head to the embedding: every matrix once is most of the file.
        let token_bytes = r["weight_bytes_per_token"].as_u64().unwrap();
        assert!(
            token_bytes <= file_bytes && token_bytes > file_bytes * 9 / 10,
            "{r}"
        );
    }
}

/// Prompt tokens `run` reports on its timing line.
fn prompt_tokens(o: &Output) -> usize {
    let err = String::from_utf8_lossy(&o.stderr);
    let at = err.find("prompt ").expect("timing line") + "prompt ".len();
    err[at..].split(' ').next().unwrap().parse().unwrap()
}

/// `run` sends an instruct model its prompt as a user message through the model's own chat
/// template (with `--system` before it); `--raw` sends the text as it is.
#[test]
fn run_applies_the_chat_template_unless_raw() {
    let path = common::model_path(MODEL);
    let file = edgelm_gguf::GgufFile::open(&path).unwrap();
    let tok = edgelm_tokenizer::Tokenizer::from_gguf(&file).unwrap();
    let template = edgelm_chat::ChatTemplate::new(tok.chat_template(), "", "").unwrap();
    assert!(!template.is_fallback(), "{MODEL} carries a template");
    let count = |messages: &[serde_json::Value]| {
        let text = template.render(messages, None, true).unwrap();
        tok.encode(&text, Encode::PROMPT).unwrap().len()
    };
    let user = edgelm_chat::Message::user("Hello");
    let system = edgelm_chat::Message::system("Answer in French.");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", MODEL, "-p", "Hello", "--temp", "0", "-n", "4"];
        args.extend(extra);
        let o = edgelm(&args);
        stdout(&o);
        prompt_tokens(&o)
    };
    assert_eq!(run(&[]), count(std::slice::from_ref(&user)));
    assert_eq!(
        run(&["--system", "Answer in French."]),
        count(&[system, user])
    );
    assert_eq!(
        run(&["--raw"]),
        tok.encode("Hello", Encode::PROMPT).unwrap().len()
    );
}

#[test]
fn bad_models_give_clear_errors() {
    let o = edgelm(&["run", "-m", "no-such-model", "-p", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("qwen2.5-coder-0.5b-instruct") && err.contains("gemma3-270m"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("edgelm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(
        &bad,
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .unwrap();
    let o = edgelm(&["run", "-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tensor count"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reports_parameters_and_memory() {
    let out = stdout(&edgelm(&["inspect", MODEL, "--ctx", "2048"]));
    assert!(out.contains("llama.block_count = 30"), "{out}");
    assert!(out.contains("Q4_1") && out.contains("parameters"));
    assert!(
        out.contains("memory plan: context 2048 × 1 sequences"),
        "{out}"
    );
    for part in ["weights", "KV cache", "scratch", "runtime", "total"] {
        assert!(out.contains(part), "{part} missing: {out}");
    }
}

/// `(prompt tokens, reused, generated)` of every `/stats` line `edgelm chat` printed.
fn chat_stats(out: &str) -> Vec<(usize, usize, usize)> {
    let num = |s: &str, after: &str| -> usize {
        let at = s
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} in {s:?}"))
            + after.len();
        s[at..].split(' ').next().unwrap().parse().unwrap()
    };
    out.lines()
        .filter(|l| l.contains("reused from the cache"))
        .map(|l| {
            let l = &l[l.find("prompt ").unwrap()..];
            (num(l, "prompt "), num(l, "tokens: "), num(l, "generated "))
        })
        .collect()
}

/// Piped stdin is answered turn by turn; each turn prefills only its new message plus at most
/// one block of the last answer (the rest comes from the prefix cache).
#[test]
fn chat_answers_piped_stdin_and_reuses_the_cache_every_turn() {
    let questions = [
        "What is 2 + 2?",
        "And 3 + 3?",
        "Name a prime number.",
        "Is 9 prime?",
        "What is the largest planet?",
        "Say goodbye.",
    ];
    let mut input = String::new();
    for q in questions {
        input.push_str(q);
        input.push_str("\n/stats\n");
    }
    let out = stdout(&chat_piped(
        "qwen2.5-coder-0.5b-instruct",
        &["--temp", "0", "-n", "24"],
        &input,
    ));
    let stats = chat_stats(&out);
    assert_eq!(stats.len(), 6, "{out}");
    for k in 1..stats.len() {
        let (prompt, reused, _) = stats[k];
        let (last_prompt, _, last_generated) = stats[k - 1];
        let new = prompt - (last_prompt + last_generated);
        assert!(
            prompt - reused <= new + 16,
            "turn {}: prefilled {} of {prompt} tokens for a new part of {new}\n{out}",
            k + 1,
            prompt - reused
        );
    }
}

/// The memory planner refuses a run over `--mem-limit`, says what context would fit, and that
/// context runs; `serve` sizes its KV cache to the limit instead of refusing. The limits are set
/// from the planner's own parts, since the measured runtime differs between machines.
#[test]
fn mem_limit_refuses_what_does_not_fit_and_says_what_does() {
    let run_16k = |limit: &str| {
        edgelm(&[
            "run",
            "-m",
            MODEL,
            "-p",
            "hi",
            "--ctx",
            "16384",
            "--mem-limit",
            limit,
        ])
    };
    let refused = run_16k("1M");
    assert!(!refused.status.success(), "a 16k context in 1 MiB ran");
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        err.contains("the weights and one sequence's scratch alone do not fit"),
        "{err}"
    );
    let part = |name: &str| -> f64 {
        err.split(&format!("{name} "))
            .nth(1)
            .and_then(|s| s.split(" MiB").next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the plan: {err}"))
    };
    let fixed = part("weights") + part("scratch") + part("runtime");
    let kv_16k = part("KV cache");
    // Room for about 2048 tokens of the 16384 asked.
    let limit = format!("{}M", (fixed + kv_16k / 8.0).ceil());
    let refused = run_16k(&limit);
    assert!(!refused.status.success(), "a 16k context in {limit} ran");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains(" MiB allowed; what would fit"), "{err}");
    let ctx: usize = err
        .split("--ctx ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no context suggested: {err}"));
    assert!((1024..16384).contains(&ctx), "{err}");
    // A little under the suggestion leaves room for the runtime measured again.
    let fits = edgelm(&[
        "run",
        "-m",
        MODEL,
        "-p",
        "hi",
        "-n",
        "4",
        "--ctx",
        &(ctx - 512).to_string(),
        "--mem-limit",
        &limit,
    ]);
    stdout(&fits);

    // Four sequences of 4096 tokens need the same KV as one of 16384; a third of it is left.
    let serve_limit = format!("{}M", (fixed + kv_16k / 3.0).ceil());
    let serve = common::ServeProcess::start(
        MODEL,
        &[
            "--parallel",
            "4",
            "--ctx",
            "4096",
            "--mem-limit",
            &serve_limit,
        ],
    );
    let log = serve.log();
    assert!(log.contains("sized to"), "{log}");
}

/// `run --session`: the second run restores the prompt's keys and values (and answers the
/// same, greedy); a damaged, foreign or other-KV-type session is refused, changing nothing.
#[test]
fn run_session_restores_the_prompt_and_refuses_bad_files() {
    let dir = std::env::temp_dir().join(format!("edgelm-session-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let session = dir.join("s.kv");
    let s = session.to_str().unwrap();
    let prompt = "Write a long story about a lighthouse keeper and the sea, with many details.";
    let run_with = |model: &str, extra: &[&str]| {
        let mut args = vec!["run", "-m", model, "-p", prompt, "-n", "12", "--temp", "0"];
        args.extend_from_slice(extra);
        common::model_path(model);
        edgelm(&args)
    };
    let run = |extra: &[&str]| run_with(MODEL, extra);
    let first = run(&["--session", s]);
    let first_text = stdout(&first);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("0 prompt tokens reused"), "{err}");
    let saved = std::fs::read(&session).unwrap();
    let second = run(&["--session", s]);
    assert_eq!(
        stdout(&second),
        first_text,
        "a restored prompt answers differently"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    let reused: usize = err
        .split("session: ")
        .filter_map(|l| l.split(" prompt tokens reused").next()?.parse().ok())
        .next()
        .unwrap_or_else(|| panic!("{err}"));
    assert!(reused >= 16, "{err}");

    let mut damaged = saved.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    for (bytes, says, model, extra) in [
        (&damaged[..], "damaged", MODEL, &[][..]),
        (&saved[..saved.len() - 100], "damaged", MODEL, &[][..]),
        (
            &b"not a session at all, just some text"[..],
            "not an edgelm session",
            MODEL,
            &[][..],
        ),
        (&saved[..], "another model", "gemma3-270m", &[][..]),
        (&saved[..], "keeps f32", MODEL, &["--precise"][..]),
        (
            &saved[..],
            "keeps q8_0 keys, f16 values (keys rotated)",
            MODEL,
            &["--cache-type-k", "q8_0"][..],
        ),
    ] {
        std::fs::write(&session, bytes).unwrap();
        let mut args = vec!["--session", s];
        args.extend_from_slice(extra);
        let out = run_with(model, &args);
        assert!(!out.status.success(), "{says}: accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{says}: {err}");
        assert_eq!(
            std::fs::read(&session).unwrap(),
            bytes,
            "{says}: the file changed"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `chat`: /save keeps the KV state beside the conversation, and a new process that /loads it
/// prefills only the new message.
#[test]
fn chat_save_and_load_keep_the_kv_state() {
    let dir = std::env::temp_dir().join(format!("edgelm-chat-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conv = dir.join("c.json");
    let chat = |input: String| stdout(&chat_piped(MODEL, &["--temp", "0", "-n", "24"], &input));
    let out = chat(format!(
        "Tell me about lighthouses and the people who kept them.\n/stats\n/save {}\n",
        conv.display()
    ));
    let (first_prompt, _, first_generated) = chat_stats(&out)[0];
    assert!(out.contains("the KV state of"), "{out}");
    let out = chat(format!("/load {}\nAnd why?\n/stats\n", conv.display()));
    assert!(out.contains("tokens of KV state restored"), "{out}");
    let (prompt, reused, _) = chat_stats(&out)[0];
    // Everything said before was restored, up to the last whole block of it.
    assert!(
        reused + 16 >= first_prompt + first_generated && prompt > reused,
        "prompt {prompt}, reused {reused}, before {first_prompt}+{first_generated}\n{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `chat --tools`: the model's call is printed, `/tool` answers it, and the model goes on with
/// the result in its context; the saved conversation holds the call in OpenAI's shape.
#[test]
fn chat_calls_tools_and_takes_their_results() {
    let model = "qwen2.5-coder-0.5b-instruct";
    let dir = std::env::temp_dir().join(format!("edgelm-chat-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tools = dir.join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]"#,
    )
    .unwrap();
    let saved = dir.join("conversation.json");
    let input = format!(
        "/tool early\nWhat is the weather in Paris?\n/tool {{\"temperature\": 18}}\n/save {}\n",
        saved.display()
    );
    let args = ["--temp", "0", "-n", "48", "--tools"].map(std::ffi::OsStr::new);
    let output = chat_piped(model, &[&args[..], &[tools.as_os_str()]].concat(), &input);
    let out = stdout(&output);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(out.contains("(tool call call_0: get_weather("), "{out}");
    // A /tool before any call has nothing to answer.
    assert!(err.contains("no tool call is waiting"), "{err}");
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let messages = conv["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    // The model's next answer (this 0.5B model tends to call again) follows the result.
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"], "{conv}");
    let call = &messages[1]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"]["city"], "Paris");
    assert_eq!(messages[2]["tool_call_id"], "call_0");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same through a terminal (a pty driven by Python): prompts, streaming, /stats, and Ctrl-C
/// stopping an answer but not the program.
#[test]
fn chat_works_in_a_terminal() {
    common::model_path(MODEL);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chat_pty.py");
    let o = Command::new("python3")
        .args([script, env!("CARGO_BIN_EXE_edgelm"), MODEL])
        .output()
        .expect("running python3");
    let out = stdout(&o);
    assert!(out.contains("/help for commands"), "{out}");
    let stats = chat_stats(&out);
    assert_eq!(stats.len(), 2, "{out}");
    assert!(stats[1].1 > 0, "the second turn reused nothing: {out}");
    assert!(
        out.contains("(stopped)"),
        "Ctrl-C did not stop the answer: {out}"
    );
}

/// `edgelm quantize` refuses bad arguments with a message naming the mistake and writes
/// nothing: an unknown type, a pattern that is not REGEX=TYPE, an unknown tensor type, an
/// output that is the input, an importance matrix that is not one, calibration options without
/// a calibration text, a calibration text that is missing or too short.
#[test]
fn quantize_refuses_bad_arguments() {
    let source = common::model_path(MODEL);
    let src = source.to_string_lossy().into_owned();
    let dir = std::env::temp_dir().join(format!("edgelm-cli-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.gguf");
    let out_s = out.to_string_lossy().into_owned();
    let junk = dir.join("junk.dat");
    std::fs::write(&junk, b"not an importance matrix").unwrap();
    let junk_s = junk.to_string_lossy().into_owned();
    for (args, says) in [
        (vec!["--type", "Q7_K"], "unknown type \"Q7_K\""),
        (
            vec!["--type", "Q4_0", "--tensor-type", "ffn_down"],
            "is not REGEX=TYPE",
        ),
        (
            vec!["--type", "Q4_0", "--tensor-type", "ffn_down=q9"],
            "unknown tensor type",
        ),
        (
            vec!["--type", "Q4_0", "--tensor-type", "ffn_(=q8_0"],
            "bad pattern",
        ),
        (
            vec!["--type", "Q4_0", "--imatrix", &junk_s],
            "legacy imatrix",
        ),
        (vec!["--type", "Q4_0", "--chunks", "4"], "--calibration"),
        (
            vec!["--type", "Q4_0", "-f", "/nonexistent/calibration.txt"],
            "reading /nonexistent/calibration.txt",
        ),
        (
            vec!["--type", "Q4_0", "-f", &junk_s],
            "less than one chunk of 512",
        ),
        (
            vec!["--type", "Q4_0", "-f", &junk_s, "-c", "0"],
            "-c 0 is too small",
        ),
        (
            vec!["--type", "Q4_0", "-f", &junk_s, "--chunks", "0"],
            "--chunks 0 runs nothing",
        ),
    ] {
        let o = edgelm(&[&["quantize", &src, &out_s][..], &args].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left a file");
    }
    let o = edgelm(&["quantize", &src, &src, "--type", "Q4_0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("overwrite the input"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C while `quantize -f` runs the calibration text stops it at the next chunk, with no
/// file left under the output's name or its temporary one.
#[test]
fn quantize_interrupted_while_calibrating_leaves_nothing() {
    use std::io::Read;
    let source = common::model_path(MODEL);
    let dir = std::env::temp_dir().join(format!("edgelm-cli-interrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Text enough for many chunks: this repository's compression bench script, four times.
    let calib = dir.join("calibration.txt");
    let mut text = String::new();
    for _ in 0..4 {
        text.push_str(include_str!("../bench/compression"));
    }
    std::fs::write(&calib, text).unwrap();
    let out = dir.join("out.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgelm"))
        .args([
            "quantize",
            &source.to_string_lossy(),
            &out.to_string_lossy(),
        ])
        .args(["--type", "Q4_0", "-f", &calib.to_string_lossy(), "-c", "64"])
        .args(["--chunks", "1000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting edgelm quantize");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut log = Vec::new();
    let mut byte = [0u8; 1];
    // The first chunk's perplexity shows the pass is under way.
    while !String::from_utf8_lossy(&log).contains("[1]") {
        match stderr.read(&mut byte) {
            Ok(1) => log.push(byte[0]),
            _ => panic!(
                "quantize ended before calibrating: {}",
                String::from_utf8_lossy(&log)
            ),
        }
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    stderr.read_to_end(&mut log).expect("reading stderr");
    let status = child.wait().expect("waiting for quantize");
    let log = String::from_utf8_lossy(&log);
    assert!(!status.success() && log.contains("interrupted"), "{log}");
    // Stopped inside the pass, not after it: fewer chunks ran than it had.
    let count = |after: &str, until: char| -> Option<usize> {
        let rest = &log[log.rfind(after)? + after.len()..];
        rest[..rest.find(until)?].trim().parse().ok()
    };
    let planned = count("collecting input moments: ", ' ').expect("the pass's chunk count");
    let ran = count("[", ']').expect("a chunk's perplexity");
    assert!(
        ran < planned,
        "all {planned} chunks ran before stopping: {log}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["calibration.txt".to_string()], "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Prune and lowrank refuse what cannot work before doing any, and say why.
#[test]
fn prune_and_lowrank_refuse_bad_arguments() {
    let source = common::model_path(MODEL);
    let src = source.to_string_lossy().into_owned();
    let dir = std::env::temp_dir().join(format!("edgelm-cli-prune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.gguf");
    let out_s = out.to_string_lossy().into_owned();
    let with = |cmd: &'static str, args: &[&'static str]| -> Vec<String> {
        let head = [cmd, "-m", &src, "-o", &out_s];
        head.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let prune = |args: &[&'static str]| with("prune", args);
    let lowrank = |args: &[&'static str]| with("lowrank", args);
    for (args, says) in [
        (prune(&[]), "nothing to prune"),
        (
            prune(&["--method", "magnitude", "--sparsity", "1.2"]),
            "outside (0, 1)",
        ),
        (
            prune(&["--method", "magnitude", "--pattern", "2-4"]),
            "is not N:M",
        ),
        (
            prune(&["--method", "magnitude", "--pattern", "2:7"]),
            "does not fit",
        ),
        (
            prune(&["--method", "wanda", "--sparsity", "0.5"]),
            "importance matrix",
        ),
        (
            prune(&["--ffn-keep", "1.5"]),
            "--ffn-keep 1.5 is outside (0, 1]",
        ),
        (
            prune(&["--heads-keep", "4"]),
            "can keep 3, 6, 9 query heads",
        ),
        (prune(&["--ffn-keep", "0.5"]), "give an importance matrix"),
        (prune(&["--drop-layers", "3,99"]), "layer 99 does not exist"),
        (
            prune(&["--drop-layers", "auto:x"]),
            "auto:K needs a whole number",
        ),
        (prune(&["--drop-layers", "auto:2"]), "calibration text"),
        (lowrank(&[]), "--rank R, --energy E or --params F"),
        (lowrank(&["--rank", "4000"]), "its rank is 1..=576"),
        (lowrank(&["--energy", "1.5"]), "outside (0, 1]"),
        (
            lowrank(&["--params", "0.5", "--tensors", "token_embd"]),
            "not a projection",
        ),
    ] {
        let o = edgelm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left a file");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
