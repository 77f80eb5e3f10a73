//! Gemma 3: embeddings scaled by √d, RMSNorm on each q/k head, norms before and after both
//! attention and FFN, GeGLU (tanh GELU), q scaled by 1/√head_dim. Five of every six layers attend
//! within a sliding window with RoPE base 10 000; every sixth is global with the file's base
//! (and its linear scaling, if any), unless `gemma3.attention.sliding_window_pattern` says
//! otherwise: a period, or one flag per layer (written by `edgelm prune --drop-layers`, read by
//! llama.cpp alike). The output head is the tied token embedding.

use crate::hparams::Meta;
use crate::layers::{Activation, Rope, RopeStyle};
use crate::transformer::{LayerAttention, Transformer, Variant};
use crate::{ModelError, Result};
use edgelm_gguf::{GgufFile, Value};
use std::sync::Arc;

/// One global layer per this many (Gemma 3's fixed interleave).
const SLIDING_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f64 = 10_000.0;

pub fn load(file: Arc<GgufFile>) -> Result<Transformer> {
    let meta = Meta {
        file: &file,
        arch: "gemma3",
    };
    let n_embd = meta.usize("embedding_length")?;
    let n_head = meta.usize("attention.head_count")?.max(1);
    let head_dim = meta
        .opt_usize("attention.key_length")
        .unwrap_or(n_embd / n_head);
    let window = meta.opt_usize("attention.sliding_window").unwrap_or(512);
    let global_base = meta.f64_or("rope.freq_base", 1_000_000.0);
    let global_scale = 1.0 / meta.f64_or("rope.scaling.factor", 1.0).max(1e-9);
    let local = Rope::new(RopeStyle::Neox, head_dim, LOCAL_ROPE_BASE, 1.0, None);
    let global = Rope::new(RopeStyle::Neox, head_dim, global_base, global_scale, None);
    let variant = Variant {
        activation: Activation::GeluTanh,
        qk_norm: true,
        post_norms: true,
        embed_scale: Some((n_embd as f32).sqrt()),
        attn_scale: Some(1.0 / (head_dim as f32).sqrt()),
    };
    let sliding = sliding_flags(&file, meta.usize("block_count")?)?;
    Transformer::load(file.clone(), "gemma3", variant, |i| {
        if !sliding.get(i).copied().unwrap_or(false) {
            LayerAttention {
                window: None,
                rope: global.clone(),
            }
        } else {
            LayerAttention {
                window: Some(window),
                rope: local.clone(),
            }
        }
    })
}

/// Which of `n_layer` layers slide: llama.cpp's rule for a period n (layer i slides when
/// i % n < n - 1, none when n is 0), or the per-layer flags of an array (layers past its end do
/// not slide). `edgelm prune` uses it to carry the flags over when it drops layers.
pub fn sliding_flags(file: &GgufFile, n_layer: usize) -> Result<Vec<bool>> {
    let key = "gemma3.attention.sliding_window_pattern";
    let malformed = |reason: &str| ModelError::Metadata {
        key: key.into(),
        reason: reason.into(),
    };
    match file.get(key) {
        None => Ok((0..n_layer)
            .map(|i| i % SLIDING_PATTERN < SLIDING_PATTERN - 1)
            .collect()),
        Some(Value::Array(a)) => (0..n_layer)
            .map(|i| match a.get(i) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| malformed("not an array of flags")),
            })
            .collect(),
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| malformed("neither a period nor an array of flags"))?
                as usize;
            Ok((0..n_layer).map(|i| n == 0 || i % n < n - 1).collect())
        }
    }
}
