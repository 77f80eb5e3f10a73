//! The memory planner on tiny models: the plan grows as the context and the sequences do; a
//! run over the limit is refused with what would fit, and what it says fits does.

mod common;

use common::{Arch, Spec, TinyModel};
use edgelm_models::{check_fits, memory_plan, KvCache, KvConfig, KvType};

fn kv(n_ctx: usize, seqs: usize, ty: KvType) -> KvConfig {
    KvConfig {
        max_seqs: seqs,
        ..KvConfig::new(n_ctx, ty)
    }
}

#[test]
fn plans_grow_with_context_and_sequences_and_match_the_cache() {
    for arch in Arch::ALL {
        let model = TinyModel::random(&Spec::tiny(arch), 1).load().unwrap();
        let small = memory_plan(&model, &kv(256, 1, KvType::F16), 0).unwrap();
        let long = memory_plan(&model, &kv(1024, 1, KvType::F16), 0).unwrap();
        let many = memory_plan(&model, &kv(256, 4, KvType::F16), 0).unwrap();
        let f32 = memory_plan(&model, &kv(256, 1, KvType::F32), 0).unwrap();
        assert!(small.weights <= model.weight_bytes());
        assert!(long.weights >= small.weights, "{arch:?}");
        assert!(long.kv_cache > small.kv_cache, "{arch:?}");
        assert!(many.kv_cache > small.kv_cache, "{arch:?}");
        assert_eq!(f32.kv_cache, 2 * small.kv_cache, "{arch:?}");
        // The plan is what the cache reserves.
        let cfg = kv(1024, 2, KvType::F16);
        assert_eq!(
            memory_plan(&model, &cfg, 0).unwrap().kv_cache,
            KvCache::plan_bytes(&model.hp, &cfg).unwrap()
        );
    }
}

#[test]
fn a_run_over_the_limit_is_refused_with_what_fits() {
    let model = TinyModel::random(&Spec::tiny(Arch::Qwen2), 2)
        .load()
        .unwrap();
    let want = kv(4096, 4, KvType::F32);
    let plan = memory_plan(&model, &want, 0).unwrap();
    // Accepted at exactly its size.
    assert_eq!(
        check_fits(&model, &want, 0, plan.total()).unwrap(),
        Ok(plan)
    );
    // Refused with room for about a quarter of the KV cache.
    let limit = plan.weights + plan.scratch + plan.kv_cache / 4;
    let no = check_fits(&model, &want, 0, limit)
        .unwrap()
        .expect_err("over the limit");
    let msg = no.to_string();
    assert!(msg.contains("what would fit"), "{msg}");
    let ctx = no.max_ctx.expect("a shorter context fits");
    let seqs = no.max_seqs.expect("fewer sequences fit");
    assert!((512..4096).contains(&ctx), "{ctx}");
    assert_eq!(seqs, 1, "{msg}");
    // f16 halves the KV cache, still twice the room; these heads (16 values) hold no
    // quantized type.
    assert_eq!(no.smaller_kv, None, "{msg}");
    // What it says fits does, and one block more does not.
    let at = kv(ctx, 4, KvType::F32);
    assert!(check_fits(&model, &at, 0, limit).unwrap().is_ok(), "{msg}");
    let over = kv(ctx + at.block_len, 4, KvType::F32);
    assert!(
        check_fits(&model, &over, 0, limit).unwrap().is_err(),
        "{msg}"
    );
    assert!(check_fits(&model, &kv(4096, seqs, KvType::F32), 0, limit)
        .unwrap()
        .is_ok());
    // Nothing fits below the weights: the message says so.
    let none = check_fits(&model, &want, 0, plan.weights / 2)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        (none.max_ctx, none.max_seqs, none.smaller_kv),
        (None, None, None)
    );
    assert!(none.to_string().contains("smaller"), "{none}");
}

#[test]
fn a_smaller_kv_type_is_offered_when_it_fits() {
    let model = TinyModel::random(&Spec::k_quantizable(Arch::Qwen2), 2)
        .load()
        .unwrap();
    let want = kv(4096, 4, KvType::F16);
    let plan = memory_plan(&model, &want, 0).unwrap();
    let q8 = memory_plan(&model, &kv(4096, 4, KvType::Q8_0), 0).unwrap();
    let q4 = memory_plan(&model, &kv(4096, 4, KvType::Q4_0), 0).unwrap();
    // q8_0 stores 34 bytes per 32 values, q4_0 18, f16 64.
    assert_eq!(q8.kv_cache * 64, plan.kv_cache * 34);
    assert_eq!(q4.kv_cache * 64, plan.kv_cache * 18);
    for (limit, offered) in [
        (q8.total(), Some(KvType::Q8_0)),
        (q4.total(), Some(KvType::Q4_0)),
        (q4.total() - 1, None),
    ] {
        let no = check_fits(&model, &want, 0, limit)
            .unwrap()
            .expect_err("over the limit");
        assert_eq!(no.smaller_kv, offered, "{no}");
        if let Some(t) = offered {
            assert!(
                no.to_string().contains(&format!("--cache-type-k {t}")),
                "{no}"
            );
        }
    }
}
