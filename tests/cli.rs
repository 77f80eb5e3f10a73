//! The `edgelm` binary end to end on the smallest real model: output formats, determinism, and
//! clear errors for bad input.

mod common;

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
    assert!(out.contains("memory at context 2048"));
}
