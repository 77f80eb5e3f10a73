//! Both arithmetic paths against float64 teacher-forced logits (../shared/refs/exact.jsonl), on
//! every instruction-set path this machine runs:
//! - precise: each of the 20 reference logits within 0.02 at every step, and the argmax equal
//!   wherever the exact margin exceeds 0.02;
//! - fast: mean abs error over the exact top-10 no larger than llama.cpp's, and the argmax equal
//!   wherever the exact margin is at least 1.0 (../shared/refs/README.md).

mod common;

use edgelm_engine::Engine;
use edgelm_kernels::{Compute, Isa, Precision};
use edgelm_models::{Batch, Scratch};

const TOLERANCE: f64 = 0.02;

/// llama.cpp's mean abs error over the exact top-10 logits on these sequences.
const LLAMA_CPP_MEAN_ERROR: [(&str, f64); 3] = [
    ("qwen2.5-coder-0.5b-instruct", 0.065),
    ("gemma3-270m", 0.233),
    ("smollm2-135m-instruct", 0.163),
];
/// Exact margin above which the fast path's argmax must equal the exact one.
const FAST_ARGMAX_MARGIN: f64 = 1.0;

/// One reference step: the exact top-20 `[id, logit]`, its top-1 margin, and our logit row.
struct Step<'a> {
    top: &'a [serde_json::Value],
    margin: f64,
    row: &'a [f32],
}

impl Step<'_> {
    fn error(&self, k: usize) -> f64 {
        let e = &self.top[k];
        (self.row[e[0].as_u64().unwrap() as usize] as f64 - e[1].as_f64().unwrap()).abs()
    }

    fn argmax_agrees(&self) -> bool {
        let argmax = self
            .row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        argmax as u64 == self.top[0][0].as_u64().unwrap()
    }
}

/// Feed every reference sequence of `model` once and visit each scored step.
fn for_each_step(
    engine: &Engine,
    refs: &[serde_json::Value],
    model: &str,
    mut visit: impl FnMut(&str, usize, Step<'_>),
) {
    let mut steps = 0;
    for line in refs.iter().filter(|l| l["model"] == model) {
        let ids = common::ids(&line["ids"]);
        let first = line["first"].as_u64().unwrap() as usize;
        let mut cache = engine.new_cache(0).unwrap();
        let seq = cache.alloc();
        let batch = Batch::from_tokens(&ids[..ids.len() - 1], 0, seq, true);
        let logits = engine
            .model
            .forward(&engine.compute, &batch, &mut cache, &mut Scratch::default())
            .unwrap();
        for (si, step) in line["steps"].as_array().unwrap().iter().enumerate() {
            let top = step["top"].as_array().unwrap();
            let margin = step["margin"].as_f64().unwrap();
            visit(
                line["prompt"].as_str().unwrap(),
                si,
                Step {
                    top,
                    margin,
                    row: logits.row(first + si),
                },
            );
            steps += 1;
        }
    }
    assert!(steps > 0, "no reference lines for {model}");
}

#[test]
fn precise_path_matches_exact_references() {
    let refs = common::jsonl("exact.jsonl");
    let mut report = Vec::new();
    for isa in Isa::available() {
        for model in common::MODELS {
            let engine = common::engine(model, isa);
            let (mut max_err, mut steps) = (0f64, 0);
            for_each_step(&engine, &refs, model, |prompt, si, step| {
                for k in 0..step.top.len() {
                    let err = step.error(k);
                    max_err = max_err.max(err);
                    assert!(
                        err <= TOLERANCE,
                        "{model} [{isa}] {prompt:?} step {si}: logit {k} off by {err}"
                    );
                }
                if step.margin > TOLERANCE {
                    assert!(
                        step.argmax_agrees(),
                        "{model} [{isa}] {prompt:?} step {si}: argmax"
                    );
                }
                steps += 1;
            });
            report.push(format!(
                "{model} [{isa}]: {steps} steps, max abs error {max_err:.6}"
            ));
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn fast_path_is_at_least_as_accurate_as_llama_cpp() {
    let refs = common::jsonl("exact.jsonl");
    let mut report = Vec::new();
    for isa in Isa::available() {
        for (model, llama_cpp) in LLAMA_CPP_MEAN_ERROR {
            let compute = Compute::with_precision(isa, 2, Precision::Fast);
            let engine = Engine::load(&common::model_path(model), compute).unwrap();
            let (mut sum, mut count, mut max_err) = (0f64, 0usize, 0f64);
            for_each_step(&engine, &refs, model, |prompt, si, step| {
                for k in 0..10 {
                    let err = step.error(k);
                    sum += err;
                    max_err = max_err.max(err);
                    count += 1;
                }
                if step.margin >= FAST_ARGMAX_MARGIN {
                    assert!(
                        step.argmax_agrees(),
                        "{model} [{isa} fast] {prompt:?} step {si}: argmax"
                    );
                }
            });
            let mean = sum / count as f64;
            report.push(format!("{model} [{isa} fast]: mean abs error {mean:.4} (llama.cpp {llama_cpp}), max {max_err:.4}"));
            assert!(mean <= llama_cpp, "{}", report.last().unwrap());
        }
    }
    eprintln!("{}", report.join("\n"));
}
