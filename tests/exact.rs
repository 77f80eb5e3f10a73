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
