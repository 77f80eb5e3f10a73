//! A session's KV state (`KvCache::load_state`: the bytes of a session file after its header
//! and checksum, which a hand-edited or crafted file controls) restored into a cache of a
//! small two-group model (one full-attention layer, one sliding-window layer): Ok or Err,
//! never a panic or an allocation the state's lengths alone would ask for. On Err the cache
//! holds what it held; on Ok the sequence saves and restores again to the same state.
//!
//! Input: one byte choosing the KV types (its value mod 3: f32; f16; q8_0 keys and q4_0 values,
//! both rotated, on heads of 32), then the state.
#![no_main]

use edgelm_models::hparams::LayerShape;
use edgelm_models::layers::{Activation, Rope, RopeStyle};
use edgelm_models::{HParams, KvCache, KvConfig, KvType, KvTypes, Pooling};
use libfuzzer_sys::fuzz_target;

/// Block length 4, context 64, two layers: full attention (2 kv heads) and a window of 6
/// (1 kv head); heads of 4 values — the shapes `examples/seed.rs` writes states for — or of 32
/// for quantized types.
fn cache(types: KvTypes) -> KvCache {
    let head_dim = if types.k.is_quantized() { 32 } else { 4 };
    let layer = |n_head_kv, window| LayerShape {
        n_head: 2,
        n_head_kv,
        n_ff: 16,
        window,
        rope: Rope::new(RopeStyle::Neox, head_dim, 10000.0, 1.0, None),
    };
    let hp = HParams {
        arch: "fuzz".into(),
        n_embd: 8,
        n_vocab: 32,
        n_ctx_train: 64,
        head_dim,
        rms_eps: 1e-6,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 0.5,
        layers: vec![layer(2, None), layer(1, Some(6))],
        pooling: Ok(Pooling::Mean),
    };
    let cfg = KvConfig {
        block_len: 4,
        max_seqs: 2,
        prefix_cache: true,
        ..KvConfig::new(64, types)
    };
    KvCache::new(&hp, cfg).expect("a valid configuration")
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, state)) = data.split_first() else {
        return;
    };
    let ty = match selector % 3 {
        0 => KvType::F32.into(),
        1 => KvType::F16.into(),
        _ => KvTypes::new(KvType::Q8_0, KvType::Q4_0),
    };
    let mut kv = cache(ty);
    let before = kv.stats();
    match kv.load_state(state) {
        Err(_) => assert_eq!(kv.stats(), before, "a refused state changed the cache"),
        Ok(seq) => {
            let saved = kv.save_state(seq).expect("a restored sequence saves");
            let mut again = cache(ty);
            let seq2 = again.load_state(&saved).expect("a saved state restores");
            assert_eq!(again.save_state(seq2).expect("saves"), saved);
            assert_eq!(kv.tokens(seq), again.tokens(seq2));
        }
    }
});
