//! Llama 2/3 family (also SmolLM, TinyLlama): pre-norm blocks, RoPE on adjacent pairs, SwiGLU.
//! Llama 3.1+ files carry `rope_freqs.weight`, per-frequency divisors for long-context scaling.

use crate::hparams::Meta;
use crate::layers::{Activation, Rope, RopeStyle};
use crate::linear::load_vector;
use crate::transformer::{LayerAttention, Transformer, Variant};
use crate::Result;
use edgelm_gguf::GgufFile;
use std::sync::Arc;

pub fn load(file: Arc<GgufFile>) -> Result<Transformer> {
    let meta = Meta {
        file: &file,
        arch: "llama",
    };
    let n_embd = meta.usize("embedding_length")?;
    let n_head = meta.usize("attention.head_count")?.max(1);
    let head_dim = meta
        .opt_usize("attention.key_length")
        .unwrap_or(n_embd / n_head);
    let n_rot = meta.opt_usize("rope.dimension_count").unwrap_or(head_dim);
    let base = meta.f64_or("rope.freq_base", 10_000.0);
    let freq_scale = 1.0 / meta.f64_or("rope.scaling.factor", 1.0).max(1e-9);
    let factors = match file.tensor_info("rope_freqs.weight") {
        Some(_) => Some(load_vector(&file, "rope_freqs.weight", n_rot / 2, "llama")?),
        None => None,
    };
    let rope = Rope::new(
        RopeStyle::Normal,
        n_rot,
        base,
        freq_scale,
        factors.as_deref(),
    );
    let variant = Variant {
        activation: Activation::Silu,
        qk_norm: false,
        post_norms: false,
        embed_scale: None,
        attn_scale: None,
    };
    let layer = |_| LayerAttention {
        window: None,
        rope: rope.clone(),
    };
    Transformer::load(file.clone(), "llama", variant, layer)
}
