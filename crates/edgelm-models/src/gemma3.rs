//! Gemma 3: embeddings scaled by √d, RMSNorm on each q/k head, norms before and after both
//! attention and FFN, GeGLU (tanh GELU), q scaled by 1/√head_dim. Five of every six layers attend
//! within a sliding window with RoPE base 10 000; every sixth is global with the file's base
//! (and its linear scaling, if any). The output head is the tied token embedding.

use crate::hparams::Meta;
use crate::layers::{Activation, Rope, RopeStyle};
use crate::transformer::{LayerAttention, Transformer, Variant};
use crate::Result;
use edgelm_gguf::GgufFile;
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
    Transformer::load(file.clone(), "gemma3", variant, |i| {
        if (i + 1) % SLIDING_PATTERN == 0 {
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
