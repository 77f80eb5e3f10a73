//! Dev check: teacher-forced logits against ../shared/refs/exact.jsonl for one model.
//! usage: exact_check MODEL_NAME GGUF_PATH REFS_JSONL
use edgelm_kernels::{Compute, Isa};
use edgelm_models::{Batch, KvCache, KvConfig, KvType, Scratch};
use std::sync::Arc;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let file = Arc::new(edgelm_gguf::GgufFile::open(&a[2]).unwrap());
    let t0 = std::time::Instant::now();
    let model = edgelm_models::load(file).unwrap();
    eprintln!("load {:?}", t0.elapsed());
    let c = Compute::precise(Isa::from_env().unwrap(), 2);
    for line in std::fs::read_to_string(&a[3]).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["model"] != a[1].as_str() {
            continue;
        }
        let ids: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let first = v["first"].as_u64().unwrap() as usize;
        let mut cache = KvCache::new(&model.hp, KvConfig::new(4096, KvType::F32)).expect("cache");
        let seq = cache.alloc();
        let t0 = std::time::Instant::now();
        let logits = model
            .forward(
                &c,
                &Batch::from_tokens(&ids[..ids.len() - 1], 0, seq, true),
                &mut cache,
                &mut Scratch::default(),
            )
            .unwrap();
        let el = t0.elapsed();
        let mut maxerr = 0f64;
        let mut bad_argmax = 0;
        for (si, step) in v["steps"].as_array().unwrap().iter().enumerate() {
            let row = logits.row(first + si);
            let top = step["top"].as_array().unwrap();
            for e in top {
                let id = e[0].as_u64().unwrap() as usize;
                let want = e[1].as_f64().unwrap();
                maxerr = maxerr.max((row[id] as f64 - want).abs());
            }
            let am = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0;
            if am as u64 != top[0][0].as_u64().unwrap() && step["margin"].as_f64().unwrap() > 0.02 {
                bad_argmax += 1;
            }
        }
        println!(
            "{} tokens in {:?}: max err {maxerr:.5}, argmax mismatches {bad_argmax}",
            ids.len(),
            el
        );
    }
}
