//! Qwen2 / Qwen2.5: the Llama block with biases on q, k, v and NeoX-style RoPE.
//! The biases are picked up by `Linear` from the file; nothing else differs.

use crate::hparams::Meta;
use crate::layers::{Activation, Rope, RopeStyle};
use crate::transformer::{LayerAttention, Transformer, Variant};
use crate::Result;
use edgelm_gguf::GgufFile;
use std::sync::Arc;

pub fn load(file: Arc<GgufFile>) -> Result<Transformer> {
    let meta = Meta {
        file: &file,
        arch: "qwen2",
    };
    let n_embd = meta.usize("embedding_length")?;
    let n_head = meta.usize("attention.head_count")?.max(1);
    // A pruned file states its head size; heads no longer divide the embedding evenly.
    let head_dim = meta
        .opt_usize("attention.key_length")
        .unwrap_or(n_embd / n_head);
    let n_rot = meta.opt_usize("rope.dimension_count").unwrap_or(head_dim);
    let base = meta.f64_or("rope.freq_base", 1_000_000.0);
    let freq_scale = 1.0 / meta.f64_or("rope.scaling.factor", 1.0).max(1e-9);
    let rope = Rope::new(RopeStyle::Neox, n_rot, base, freq_scale, None);
    let variant = Variant {
        activation: Activation::Silu,
        qk_norm: false,
        post_norms: false,
        embed_scale: None,
        attn_scale: None,
    };
    Transformer::load(file.clone(), "qwen2", variant, |_| LayerAttention {
        window: None,
        rope: rope.clone(),
    })
}
