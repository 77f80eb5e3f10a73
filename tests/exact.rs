//! The precise path against float64 teacher-forced logits (../shared/refs/exact.jsonl), on every
//! instruction-set path this machine runs: each of the 20 reference logits within 0.02 at every
//! step, and the argmax equal wherever the exact margin exceeds 0.02.

mod common;

use edgelm_kernels::Isa;
use edgelm_models::Batch;

const TOLERANCE: f64 = 0.02;

#[test]
fn precise_path_matches_exact_references() {
    let refs = common::jsonl("exact.jsonl");
    let mut report = Vec::new();
    for isa in Isa::available() {
        for model in common::MODELS {
            let engine = common::engine(model, isa);
            let mut max_err = 0f64;
            let mut steps = 0;
            for line in refs.iter().filter(|l| l["model"] == model) {
                let ids = common::ids(&line["ids"]);
                let first = line["first"].as_u64().unwrap() as usize;
                let mut cache = engine.new_cache(0);
                let batch = Batch::from_tokens(&ids[..ids.len() - 1], 0, 0, true);
                let logits = engine
                    .model
                    .forward(&engine.compute, &batch, &mut cache)
                    .unwrap();
                for (si, step) in line["steps"].as_array().unwrap().iter().enumerate() {
                    let row = logits.row(first + si);
                    let top = step["top"].as_array().unwrap();
                    for e in top {
                        let id = e[0].as_u64().unwrap() as usize;
                        let err = (row[id] as f64 - e[1].as_f64().unwrap()).abs();
                        max_err = max_err.max(err);
                        assert!(
                            err <= TOLERANCE,
                            "{model} [{isa}] {:?} step {si}: logit of {id} off by {err}",
                            line["prompt"]
                        );
                    }
                    let argmax = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0;
                    if step["margin"].as_f64().unwrap() > TOLERANCE {
                        assert_eq!(
                            argmax as u64,
                            top[0][0].as_u64().unwrap(),
                            "{model} [{isa}] step {si}: argmax"
                        );
                    }
                    steps += 1;
                }
            }
            assert!(steps > 0, "no reference lines for {model}");
            report.push(format!(
                "{model} [{isa}]: {steps} steps, max abs error {max_err:.6}"
            ));
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// llama.cpp's mean abs error over the exact top-10 logits on these sequences
/// (../shared/refs/README.md): the fast path must be no worse.
const LLAMA_CPP_MEAN_ERROR: [(&str, f64); 3] = [
    ("qwen2.5-coder-0.5b-instruct", 0.065),
    ("gemma3-270m", 0.233),
    ("smollm2-135m-instruct", 0.163),
];
/// Exact margin above which the fast path's argmax must equal the exact one.
const FAST_ARGMAX_MARGIN: f64 = 1.0;

#[test]
fn fast_path_is_at_least_as_accurate_as_llama_cpp() {
    use edgelm_engine::Engine;
    use edgelm_kernels::{Compute, Precision};
    let refs = common::jsonl("exact.jsonl");
    let mut report = Vec::new();
    for isa in Isa::available() {
        for (model, llama_cpp) in LLAMA_CPP_MEAN_ERROR {
            let compute = Compute::with_precision(isa, 2, Precision::Fast);
            let engine = Engine::load(&common::model_path(model), compute).unwrap();
            let (mut sum, mut count, mut max_err) = (0f64, 0usize, 0f64);
            for line in refs.iter().filter(|l| l["model"] == model) {
                let ids = common::ids(&line["ids"]);
                let first = line["first"].as_u64().unwrap() as usize;
                let mut cache = engine.new_cache(0);
                let batch = Batch::from_tokens(&ids[..ids.len() - 1], 0, 0, true);
                let logits = engine
                    .model
                    .forward(&engine.compute, &batch, &mut cache)
                    .unwrap();
                for (si, step) in line["steps"].as_array().unwrap().iter().enumerate() {
                    let row = logits.row(first + si);
                    let top = step["top"].as_array().unwrap();
                    for e in &top[..10] {
                        let err = (row[e[0].as_u64().unwrap() as usize] as f64
                            - e[1].as_f64().unwrap())
                        .abs();
                        sum += err;
                        max_err = max_err.max(err);
                        count += 1;
                    }
                    let argmax = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0;
                    if step["margin"].as_f64().unwrap() >= FAST_ARGMAX_MARGIN {
                        assert_eq!(
                            argmax as u64,
                            top[0][0].as_u64().unwrap(),
                            "{model} [{isa}] step {si}: argmax"
                        );
                    }
                }
            }
            let mean = sum / count as f64;
            report.push(format!("{model} [{isa} fast]: mean abs error {mean:.4} (llama.cpp {llama_cpp}), max {max_err:.4}"));
            assert!(mean <= llama_cpp, "{}", report.last().unwrap());
        }
    }
    eprintln!("{}", report.join("\n"));
}
