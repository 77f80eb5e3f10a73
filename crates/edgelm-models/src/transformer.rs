//! The decoder-only transformer every supported architecture is made of. Architecture files
//! choose the variant (`Variant`); this file holds the shared loading and the batched forward.

use crate::batch::{Batch, Logits};
use crate::hparams::{HParams, LayerShape, Meta, Pooling};
use crate::kv::{key_rotation, value_rotation, KvCache};
use crate::layers::{rms_norm, Activation, Rope};
use crate::linear::{load_vector, Forward, Linear, WeightRef};
use crate::{ModelError, Result};
use edgelm_gguf::GgufFile;
use edgelm_kernels::{hadamard_rotate, merge_partials, ActivationPrecision, Compute, QueryBlock};
use std::sync::Arc;

/// The largest chunk of a batch processed per layer pass; bounds the scratch and the blocks a
/// sliding window holds.
pub const MAX_CHUNK: usize = 512;

/// What distinguishes one architecture's block from another's.
#[derive(Debug, Clone)]
pub struct Variant {
    pub activation: Activation,
    /// Gemma: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Gemma: RMSNorm on the attention and FFN outputs before the residual add.
    pub post_norms: bool,
    pub embed_scale: Option<f32>,
    /// Overrides 1/√head_dim.
    pub attn_scale: Option<f32>,
}

/// Per-layer attention settings an architecture derives from its metadata.
pub struct LayerAttention {
    pub window: Option<usize>,
    pub rope: Rope,
}

struct Block {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
}

/// A loaded model: immutable, shared between runners (`Arc`). Whoever runs it owns the run
/// state: a [`KvCache`] and a [`Scratch`].
pub struct Transformer {
    pub hp: HParams,
    tok_embd: WeightRef,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    output: Linear,
    file: Arc<GgufFile>,
    /// Per layer, the first layer with the same rotation: whose sin/cos table it reads.
    rope_table_of: Vec<usize>,
}

impl Transformer {
    /// Load the shared structure. `layer_attention(i)` gives layer i's window and RoPE.
    pub fn load(
        file: Arc<GgufFile>,
        arch: &str,
        variant: Variant,
        layer_attention: impl Fn(usize) -> LayerAttention,
    ) -> Result<Transformer> {
        let meta = Meta { file: &file, arch };
        let n_layer = meta.usize("block_count")?;
        let n_embd = meta.usize("embedding_length")?;
        let n_head0 = meta.usize("attention.head_count")?;
        let head_dim = meta
            .opt_usize("attention.key_length")
            .unwrap_or(n_embd / n_head0.max(1));
        if head_dim == 0 {
            return Err(ModelError::Metadata {
                key: meta.key("attention.key_length"),
                reason: "head size 0".into(),
            });
        }
        if let Some(v) = meta.opt_usize("attention.value_length") {
            if v != head_dim {
                return Err(ModelError::Metadata {
                    key: meta.key("attention.value_length"),
                    reason: format!(
                        "{v} differs from key length {head_dim}, which edgelm does not support"
                    ),
                });
            }
        }
        let rms_eps = meta.f64_or("attention.layer_norm_rms_epsilon", 1e-6) as f32;
        let tok_embd = WeightRef::load(&file, "token_embd.weight", Some(n_embd), arch)?;
        let n_vocab = tok_embd.rows;
        let output = match file.tensor_info("output.weight") {
            Some(_) => Linear::load(&file, "output", n_embd, arch)?,
            // Tied: one weight, repacked once for both the head and the embedding lookup.
            None => Linear::dense(tok_embd.clone()),
        };
        if output.out_features() != n_vocab {
            return Err(ModelError::Shape {
                name: "output.weight".into(),
                got: vec![n_embd as u64, output.out_features() as u64],
                expected: format!("{n_vocab} rows (the vocabulary)"),
            });
        }
        let output_norm = load_vector(&file, "output_norm.weight", n_embd, arch)?;

        let mut blocks = Vec::with_capacity(n_layer);
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let lin = |s: &str, inp: usize| Linear::load(&file, &p(s), inp, arch);
            let vec = |s: &str, n: usize| load_vector(&file, &p(s), n, arch);
            let opt_vec = |s: &str, n: usize| match file.tensor_info(&p(s)) {
                Some(_) => vec(s, n).map(Some),
                None => Ok(None),
            };
            let wq = lin("attn_q", n_embd)?;
            let mut wk = lin("attn_k", n_embd)?;
            let mut wv = lin("attn_v", n_embd)?;
            let heads = |l: &Linear, what: &str| -> Result<usize> {
                if !l.out_features().is_multiple_of(head_dim) {
                    return Err(ModelError::Shape {
                        name: l.name.clone(),
                        got: vec![l.in_features() as u64, l.out_features() as u64],
                        expected: format!("{what} width a multiple of the head size {head_dim}"),
                    });
                }
                Ok(l.out_features() / head_dim)
            };
            let n_head = heads(&wq, "query")?;
            let n_head_kv = heads(&wk, "key")?;
            if n_head_kv == 0 || n_head % n_head_kv != 0 || wv.out_features() != wk.out_features() {
                return Err(ModelError::Shape {
                    name: p("attn_v.weight"),
                    got: vec![n_embd as u64, wv.out_features() as u64],
                    expected: format!("{n_head} query heads grouped over the key/value heads"),
                });
            }
            let wo = lin("attn_output", n_head * head_dim)?;
            let gate = lin("ffn_gate", n_embd)?;
            let n_ff = gate.out_features();
            let up = lin("ffn_up", n_embd)?;
            let down = lin("ffn_down", n_ff)?;
            // Keys and values get the two-pass input quantization: their errors stay in the
            // cache and touch every later attention score, and measured against the float64
            // references this is what brings the fast path below llama.cpp's logit error on all
            // three models (the kv projections are narrow, so it costs little). Refining the
            // down projection too would cut the error by another half at ~10% of prefill speed.
            wk.input_precision = ActivationPrecision::Refined;
            wv.input_precision = ActivationPrecision::Refined;
            for (l, want, name) in [
                (&wo, n_embd, "attn_output"),
                (&up, n_ff, "ffn_up"),
                (&down, n_embd, "ffn_down"),
            ] {
                if l.out_features() != want {
                    return Err(ModelError::Shape {
                        name: p(&format!("{name}.weight")),
                        got: vec![l.in_features() as u64, l.out_features() as u64],
                        expected: format!("{want} rows"),
                    });
                }
            }
            let (q_norm, k_norm) = if variant.qk_norm {
                (
                    Some(vec("attn_q_norm.weight", head_dim)?),
                    Some(vec("attn_k_norm.weight", head_dim)?),
                )
            } else {
                (None, None)
            };
            let (post_attn_norm, post_ffn_norm) = if variant.post_norms {
                (
                    Some(vec("post_attention_norm.weight", n_embd)?),
                    Some(vec("post_ffw_norm.weight", n_embd)?),
                )
            } else {
                (
                    opt_vec("post_attention_norm.weight", n_embd)?,
                    opt_vec("post_ffw_norm.weight", n_embd)?,
                )
            };
            let att = layer_attention(i);
            if att.rope.n_rot > head_dim || !att.rope.n_rot.is_multiple_of(2) {
                return Err(ModelError::Metadata {
                    key: meta.key("rope.dimension_count"),
                    reason: format!(
                        "{} rotated dimensions do not fit heads of {head_dim} (an even count up \
                         to the head size is needed)",
                        att.rope.n_rot
                    ),
                });
            }
            layers.push(LayerShape {
                n_head,
                n_head_kv,
                n_ff,
                window: att.window,
                rope: att.rope,
            });
            blocks.push(Block {
                attn_norm: vec("attn_norm.weight", n_embd)?,
                wq,
                wk,
                wv,
                wo,
                q_norm,
                k_norm,
                post_attn_norm,
                ffn_norm: vec("ffn_norm.weight", n_embd)?,
                gate,
                up,
                down,
                post_ffn_norm,
            });
        }
        let hp = HParams {
            arch: arch.into(),
            n_embd,
            n_vocab,
            n_ctx_train: meta.opt_usize("context_length").unwrap_or(2048),
            head_dim,
            rms_eps,
            activation: variant.activation,
            embed_scale: variant.embed_scale,
            attn_scale: variant.attn_scale.unwrap_or(1.0 / (head_dim as f32).sqrt()),
            layers,
            pooling: Pooling::from_gguf(file.get_u64(&meta.key("pooling_type"))),
        };
        let rope_table_of = (0..hp.layers.len())
            .map(|l| {
                (0..l)
                    .find(|&f| hp.layers[f].rope == hp.layers[l].rope)
                    .unwrap_or(l)
            })
            .collect();
        Ok(Transformer {
            hp,
            tok_embd,
            blocks,
            output_norm,
            output,
            file,
            rope_table_of,
        })
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// Every matrix the forward pass multiplies by (a tied head shares the embedding's).
    pub fn matrices(&self) -> Vec<&WeightRef> {
        let mut all = Vec::new();
        for b in &self.blocks {
            for l in [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down] {
                all.extend(l.weights());
            }
        }
        all.extend(self.output.weights());
        all
    }

    /// Bytes of weights the forward pass reads.
    pub fn weight_bytes(&self) -> u64 {
        let mut total = self.tok_embd.n_bytes() as u64;
        if self.output.name != self.tok_embd.name {
            total += self.output.n_bytes() as u64;
        }
        for b in &self.blocks {
            for l in [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down] {
                total += l.n_bytes() as u64;
            }
        }
        total
    }

    /// Bytes of weights one decoded token reads: every matrix once, and one row of an embedding
    /// table that is not also the output head. Decoding speed over this is the bandwidth it
    /// draws (the KV cache's bytes at depth come on top).
    pub fn decode_weight_bytes(&self) -> u64 {
        let matrices: u64 = self.matrices().iter().map(|w| w.n_bytes() as u64).sum();
        let lookup = if self.output.name == self.tok_embd.name {
            0
        } else {
            (self.tok_embd.n_bytes() / self.tok_embd.rows.max(1)) as u64
        };
        matrices + lookup
    }

    /// Bytes of weights resident after a run over `positions` tokens: every matrix the
    /// forward pass multiplies by, and of an embedding table that is not also the output head
    /// only the rows looked up — a page (4 KiB, or a whole row) per distinct token. Distinct
    /// tokens grow as text does by Heaps' law, taken as `60·√positions` (every position new up
    /// to 3,600 of them); text with more variety touches more, but those pages are clean and
    /// mapped from the file, so the system reclaims them before it would swap.
    pub fn resident_weight_bytes(&self, positions: usize) -> u64 {
        let all = self.weight_bytes();
        if self.output.name == self.tok_embd.name {
            return all;
        }
        let table = self.tok_embd.n_bytes() as u64;
        let row = table / self.tok_embd.rows.max(1) as u64;
        let distinct = (positions as f64).min(60.0 * (positions as f64).sqrt()) as u64;
        all - table + (distinct * row.max(4096)).min(table)
    }

    /// Context shift: drop positions `keep .. keep + discard` of `seq` (`discard` whole blocks)
    /// and move the later ones down, re-rotating their keys to their new positions (undoing and
    /// redoing the cache's Hadamard rotation around it). Their keys and values were computed
    /// beside the dropped tokens, so later logits are an approximation llama.cpp's
    /// `--context-shift` makes too; fails, changing nothing, where a sliding window already
    /// released keys the shifted sequence reads.
    pub fn shift_context(
        &self,
        cache: &mut KvCache,
        seq: usize,
        keep: usize,
        discard: usize,
    ) -> Result<()> {
        cache.shift(seq, keep, discard)?;
        let hd = self.hp.head_dim;
        let rotated = cache.config().types.rotate_keys;
        let r = key_rotation(hd);
        for (li, shape) in self.hp.layers.iter().enumerate() {
            let rope = &shape.rope;
            // The rotation by −discard: sin(−θ) = −sin θ, cos(−θ) = cos θ.
            let mut back = vec![0f32; rope.n_rot];
            rope.sin_cos(discard, &mut back);
            back[..rope.n_rot / 2].iter_mut().for_each(|s| *s = -*s);
            cache.update_keys(seq, li, keep, &mut |key| {
                if rotated {
                    hadamard_rotate(key, r);
                }
                rope.rotate(key, hd, &back);
                if rotated {
                    hadamard_rotate(key, r);
                }
            });
        }
        Ok(())
    }

    /// Run a batch through the model, appending its keys and values to `cache`, and return the
    /// logits (and final hidden states) of the tokens that asked for them. Every sequence of the
    /// batch must be allocated in `cache`, and its tokens continue it.
    pub fn forward(
        &self,
        c: &Compute,
        batch: &Batch,
        cache: &mut KvCache,
        scratch: &mut Scratch,
    ) -> Result<Logits> {
        let mut logits = Logits::default();
        self.forward_into(c, batch, cache, scratch, &mut logits)?;
        Ok(logits)
    }

    /// [`Transformer::forward`] into `logits`, whose buffers are reused: a decoding loop that
    /// passes the same one allocates no logits per token.
    pub fn forward_into(
        &self,
        c: &Compute,
        batch: &Batch,
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Logits,
    ) -> Result<()> {
        self.forward_with(Forward::new(c), batch, cache, scratch, logits)
    }

    /// [`Transformer::forward_into`] with a forward context: an observer, when it has one, sees
    /// every projection's input.
    pub fn forward_with(
        &self,
        f: Forward,
        batch: &Batch,
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Logits,
    ) -> Result<()> {
        logits.batch_index.clear();
        logits.data.clear();
        logits.n_vocab = self.hp.n_vocab;
        logits.embd_index.clear();
        logits.embd.clear();
        logits.n_embd = self.hp.n_embd;
        let n = batch.len();
        if [
            batch.positions.len(),
            batch.seqs.len(),
            batch.want_logits.len(),
            batch.want_embd.len(),
        ]
        .iter()
        .any(|&l| l != n)
        {
            return Err(ModelError::Batch(
                "tokens, positions, sequences, logit and hidden-state flags differ in length"
                    .into(),
            ));
        }
        if let Some(&t) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.hp.n_vocab)
        {
            return Err(ModelError::Batch(format!(
                "token id {t} is outside the vocabulary of {}",
                self.hp.n_vocab
            )));
        }
        // Validate every sequence's run before touching the cache.
        let mut next: Vec<(usize, usize, usize)> = Vec::new(); // (seq, first pos, count)
        for i in 0..n {
            let (s, p) = (batch.seqs[i], batch.positions[i]);
            match next.iter_mut().find(|e| e.0 == s) {
                Some(e) if e.1 + e.2 == p => e.2 += 1,
                Some(e) => {
                    return Err(ModelError::Batch(format!(
                        "sequence {s}: position {p} does not follow {} in the batch",
                        e.1 + e.2 - 1
                    )))
                }
                None => next.push((s, p, 1)),
            }
        }
        for &(s, p, count) in &next {
            cache.check_append(s, p, count)?;
        }
        let mut start = 0;
        while start < n {
            let end = (start + MAX_CHUNK).min(n);
            self.forward_chunk(&f, batch, start..end, cache, scratch, logits)?;
            start = end;
        }
        Ok(())
    }

    fn forward_chunk(
        &self,
        f: &Forward,
        batch: &Batch,
        range: std::ops::Range<usize>,
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Logits,
    ) -> Result<()> {
        let c = f.compute;
        let hp = &self.hp;
        let n = range.len();
        let d = hp.n_embd;
        let hd = hp.head_dim;
        let tokens = &batch.tokens[range.clone()];
        let positions = &batch.positions[range.clone()];
        let seqs = &batch.seqs[range.clone()];
        // Each sequence's run in the chunk (validated to be contiguous by `forward_into`).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (seq, first pos, first index)
        for (t, &s) in seqs.iter().enumerate() {
            if !runs.iter().any(|r| r.0 == s) {
                runs.push((s, positions[t], t));
            }
        }
        for &(s, first, _) in &runs {
            let count = seqs.iter().filter(|&&x| x == s).count();
            cache.reserve(s, first, count)?;
        }

        let Scratch {
            x,
            h,
            q,
            k,
            v,
            att,
            o,
            g,
            u,
            xs,
            rope_tables,
        } = scratch;
        let x = fit(x, n * d);
        self.tok_embd.rows(tokens, x)?;
        if let Some(s) = hp.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }

        let h = fit(h, n * d);
        // One sin/cos table per chunk and rotation, shared by q, k and the layers alike.
        rope_tables.resize_with(hp.layers.len(), Vec::new);
        for (li, shape) in hp.layers.iter().enumerate() {
            if self.rope_table_of[li] == li {
                let n_rot = shape.rope.n_rot;
                let table = fit(&mut rope_tables[li], n * n_rot);
                for (row, &p) in table.chunks_exact_mut(n_rot).zip(positions) {
                    shape.rope.sin_cos(p, row);
                }
            }
        }
        for (li, (b, shape)) in self.blocks.iter().zip(&hp.layers).enumerate() {
            f.residual(li, x, d, n);
            let q_dim = shape.n_head * hd;
            let kv_dim = shape.n_head_kv * hd;
            h.copy_from_slice(x);
            norm_rows(c, h, &b.attn_norm, hp.rms_eps);
            let (q, k, v) = (fit(q, n * q_dim), fit(k, n * kv_dim), fit(v, n * kv_dim));
            Linear::forward_group(f, [&b.wq, &b.wk, &b.wv], h, n, [q, k, v])?;
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                norm_rows(c, q, qn, hp.rms_eps);
                norm_rows(c, k, kn, hp.rms_eps);
            }
            let rope = &shape.rope;
            let table = &rope_tables[self.rope_table_of[li]];
            let sin_cos = |t: usize| &table[t * rope.n_rot..(t + 1) * rope.n_rot];
            c.par_chunks_mut(q, q_dim, &|t, row| rope.rotate(row, hd, sin_cos(t)));
            c.par_chunks_mut(k, kv_dim, &|t, row| rope.rotate(row, hd, sin_cos(t)));
            let types = cache.config().types;
            if types.rotate_keys {
                // Queries turn with the keys, so every score is unchanged.
                let r = key_rotation(hd);
                c.par_chunks_mut(q, q_dim, &|_, row| hadamard_rotate(row, r));
                c.par_chunks_mut(k, kv_dim, &|_, row| hadamard_rotate(row, r));
            }
            if types.rotate_values {
                // Turned back in attention's output (the rotation is its own inverse).
                let r = value_rotation(hd);
                c.par_chunks_mut(v, kv_dim, &|_, row| hadamard_rotate(row, r));
            }
            cache.write_rows(c, li, seqs, positions, k, v);

            let att = fit(att, n * q_dim);
            self.attention(c, cache, li, shape, q, positions, seqs, att);
            if types.rotate_values {
                let r = value_rotation(hd);
                c.par_chunks_mut(att, q_dim, &|_, row| hadamard_rotate(row, r));
            }
            let o = fit(o, n * d);
            b.wo.forward(f, att, n, o)?;
            if let Some(w) = &b.post_attn_norm {
                norm_rows(c, o, w, hp.rms_eps);
            }
            x.iter_mut().zip(o.iter()).for_each(|(x, o)| *x += o);

            h.copy_from_slice(x);
            norm_rows(c, h, &b.ffn_norm, hp.rms_eps);
            let (g, u) = (fit(g, n * shape.n_ff), fit(u, n * shape.n_ff));
            Linear::forward_group(f, [&b.gate, &b.up], h, n, [g, u])?;
            let (act, n_ff) = (hp.activation, shape.n_ff);
            c.par_chunks_mut(g, n_ff, &|t, gate| {
                c.glu(act, gate, &u[t * n_ff..(t + 1) * n_ff])
            });
            b.down.forward(f, g, n, o)?;
            if let Some(w) = &b.post_ffn_norm {
                norm_rows(c, o, w, hp.rms_eps);
            }
            x.iter_mut().zip(o.iter()).for_each(|(x, o)| *x += o);
        }
        f.residual(self.blocks.len(), x, d, n);
        let mut run_tokens = Vec::new();
        for &(s, _, from) in &runs {
            run_tokens.clear();
            run_tokens.extend((from..n).filter(|&t| seqs[t] == s).map(|t| tokens[t]));
            cache.append_tokens(s, &run_tokens);
        }

        // Hidden states after the final norm (llama.cpp's `result_norm`), without the head.
        let at = logits.embd.len();
        for t in (0..n).filter(|&t| batch.want_embd[range.start + t]) {
            logits.embd.extend_from_slice(&x[t * d..(t + 1) * d]);
            logits.embd_index.push(range.start + t);
        }
        if logits.embd.len() > at {
            norm_rows(c, &mut logits.embd[at..], &self.output_norm, hp.rms_eps);
        }

        // Final norm and output head only for the rows that want logits.
        let wanted: Vec<usize> = (0..n)
            .filter(|&t| batch.want_logits[range.start + t])
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let xs = fit(xs, wanted.len() * d);
        for (row, &t) in xs.chunks_exact_mut(d).zip(&wanted) {
            row.copy_from_slice(&x[t * d..(t + 1) * d]);
        }
        rms_norm(xs, &self.output_norm, hp.rms_eps);
        let at = logits.data.len();
        logits.data.resize(at + wanted.len() * hp.n_vocab, 0.0);
        self.output
            .forward(f, xs, wanted.len(), &mut logits.data[at..])?;
        logits
            .batch_index
            .extend(wanted.iter().map(|t| range.start + t));
        Ok(())
    }

    /// Causal (and, for windowed layers, sliding) attention of every query head of the chunk.
    /// A token's arithmetic depends only on its position and on whether it is one of a run of
    /// its sequence's consecutive positions (a prompt's chunk), never on what else the batch
    /// holds, so a request's greedy output is the same alone or beside others.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        c: &Compute,
        cache: &KvCache,
        layer: usize,
        shape: &LayerShape,
        q: &[f32],
        positions: &[usize],
        seqs: &[usize],
        out: &mut [f32],
    ) {
        let in_run = |t: usize| seqs[t] == seqs[t - 1] && positions[t] == positions[t - 1] + 1;
        if (1..positions.len()).any(in_run) {
            return self.attention_blocks(c, cache, layer, shape, q, positions, seqs, out);
        }
        if positions
            .iter()
            .any(|&p| parts(p + 1 - first_key(shape.window, p)) > 1)
        {
            return self.attention_split(c, cache, layer, shape, q, positions, seqs, out);
        }
        let hd = self.hp.head_dim;
        let n_head = shape.n_head;
        let group = n_head / shape.n_head_kv;
        let scale = self.hp.attn_scale;
        // A task is one token's group of query heads sharing a kv head (each key and value is
        // read and widened once for the group) — or a single head when there are fewer groups
        // than threads (a lone token of a model with one kv head).
        let per_task = if positions.len() * shape.n_head_kv < c.n_threads() {
            1
        } else {
            group
        };
        let tasks_per_token = n_head / per_task;
        // `out` is (token, head, head_dim): task i's heads are its i-th chunk.
        c.par_chunks_mut(out, per_task * hd, &|task, o| {
            let (t, first_head) = (task / tasks_per_token, task % tasks_per_token * per_task);
            let pos = positions[t];
            let first = first_key(shape.window, pos);
            let kv_h = first_head / group;
            let cols = kv_h * hd..(kv_h + 1) * hd;
            let heads = (t * n_head + first_head) * hd..(t * n_head + first_head + per_task) * hd;
            let kv = cache.view(seqs[t], layer, first, pos + 1 - first, cols);
            SCORES.with_borrow_mut(|scores| {
                c.attend_heads(&q[heads.clone()], hd, &kv, scale, scores, o)
            });
        });
    }

    /// Attention of runs of consecutive tokens (prefill): a task is a piece of a run, which
    /// attends kv head by kv head with all the group's query heads of all its tokens at once ([`Compute::attend_block`]: every key widened once per block, not once per
    /// token); a lone token attends as decoding does.
    #[allow(clippy::too_many_arguments)]
    fn attention_blocks(
        &self,
        c: &Compute,
        cache: &KvCache,
        layer: usize,
        shape: &LayerShape,
        q: &[f32],
        positions: &[usize],
        seqs: &[usize],
        out: &mut [f32],
    ) {
        let hd = self.hp.head_dim;
        let (n_head, n_kv) = (shape.n_head, shape.n_head_kv);
        let group = n_head / n_kv;
        let q_dim = n_head * hd;
        let scale = self.hp.attn_scale;
        // About 64 query rows (tokens × group heads) per block: four 16-lane vectors. A run is
        // cut into even pieces (never a lone token, whose arithmetic is decoding's), a lone
        // token is a piece of its own.
        let per_piece = (64 / group).max(2);
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < positions.len() {
            let mut end = start + 1;
            while end < positions.len()
                && seqs[end] == seqs[start]
                && positions[end] == positions[end - 1] + 1
            {
                end += 1;
            }
            let n = (end - start).div_ceil(per_piece);
            pieces.extend(
                (0..n).map(|i| start + i * (end - start) / n..start + (i + 1) * (end - start) / n),
            );
            start = end;
        }
        let rows: Vec<_> = pieces
            .iter()
            .map(|p| p.start * q_dim..p.end * q_dim)
            .collect();
        c.par_ranges_mut(out, &rows, &|i, o| {
            let (start, end) = (pieces[i].start, pieces[i].end);
            let seq = seqs[start];
            let spans: Vec<(usize, usize)> = positions[start..end]
                .iter()
                .map(|&p| (first_key(shape.window, p), p + 1))
                .collect();
            let (from, to) = (spans[0].0, spans[spans.len() - 1].1);
            for kv_h in 0..n_kv {
                let at = kv_h * group * hd;
                let q_run = &q[start * q_dim + at..end * q_dim];
                let o_run = &mut o[at..];
                if end - start == 1 {
                    let heads = (&q_run[..group * hd], &mut o_run[..group * hd]);
                    let token = (seq, positions[start]);
                    self.attend_alone(c, cache, layer, shape, token, kv_h, heads);
                    continue;
                }
                let cols = kv_h * hd..(kv_h + 1) * hd;
                let kv = cache.view(seq, layer, from, to - from, cols);
                let block = QueryBlock {
                    q: q_run,
                    stride: q_dim,
                    heads: group,
                    spans: &spans,
                };
                SCORES.with_borrow_mut(|scratch| {
                    c.attend_block(&block, hd, &kv, scale, scratch, o_run)
                });
            }
        });
    }

    /// One token's query heads of kv head `kv_h` on the calling thread, with the arithmetic of
    /// [`Self::attention`] and [`Self::attention_split`] for a lone token: its keys in
    /// [`parts`], each attended apart, merged in order.
    #[allow(clippy::too_many_arguments)]
    fn attend_alone(
        &self,
        c: &Compute,
        cache: &KvCache,
        layer: usize,
        shape: &LayerShape,
        (seq, pos): (usize, usize),
        kv_h: usize,
        (q, out): (&[f32], &mut [f32]),
    ) {
        let hd = self.hp.head_dim;
        let heads = q.len() / hd;
        let scale = self.hp.attn_scale;
        let first = first_key(shape.window, pos);
        let n = pos + 1 - first;
        let cols = kv_h * hd..(kv_h + 1) * hd;
        let parts = parts(n);
        if parts == 1 {
            let kv = cache.view(seq, layer, first, n, cols);
            return SCORES.with_borrow_mut(|scores| c.attend_heads(q, hd, &kv, scale, scores, out));
        }
        let part_len = heads * hd + 2 * heads;
        // This thread's split buffer: a pool thread here, never inside `attention_split`.
        SPLIT.with_borrow_mut(|(_, buf)| {
            buf.clear();
            buf.resize(parts * part_len, 0.0);
            for (part, chunk) in buf.chunks_exact_mut(part_len).enumerate() {
                let (from, to) = part_span(first, n, part, parts);
                let kv = cache.view(seq, layer, from, to - from, cols.clone());
                let (o, stats) = chunk.split_at_mut(heads * hd);
                SCORES.with_borrow_mut(|scores| {
                    c.attend_heads_partial(q, hd, 1, &kv, scale, scores, o, stats)
                });
            }
            let it = buf.chunks_exact(part_len).map(|p| p.split_at(heads * hd));
            merge_partials(it, heads, hd, out);
        });
    }

    /// Attention of lone tokens (decoding) of which some read long contexts: each token's keys
    /// are cut into [`parts`] attended in parallel, every part by all the query heads at once
    /// (each kv head's keys read and widened once for its group, whole slot rows streamed in
    /// order), then merged exactly in order (flash decoding).
    #[allow(clippy::too_many_arguments)]
    fn attention_split(
        &self,
        c: &Compute,
        cache: &KvCache,
        layer: usize,
        shape: &LayerShape,
        q: &[f32],
        positions: &[usize],
        seqs: &[usize],
        out: &mut [f32],
    ) {
        let hd = self.hp.head_dim;
        let (n_head, n_kv) = (shape.n_head, shape.n_head_kv);
        let q_dim = n_head * hd;
        let scale = self.hp.attn_scale;
        let part_len = q_dim + 2 * n_head;
        let span = |t: usize| {
            let first = first_key(shape.window, positions[t]);
            (first, positions[t] + 1 - first)
        };
        SPLIT.with_borrow_mut(|(tasks, buf)| {
            // Task i attends part `part` of `parts` of token t's keys; the parts of one token
            // are adjacent.
            tasks.clear();
            for t in 0..positions.len() {
                let parts = parts(span(t).1);
                tasks.extend((0..parts).map(|part| (t, part, parts)));
            }
            buf.clear();
            buf.resize(tasks.len() * part_len, 0.0);
            let tasks = &*tasks;
            c.par_chunks_mut(buf, part_len, &|task, chunk| {
                let (t, part, parts) = tasks[task];
                let (first, n) = span(t);
                let (from, to) = part_span(first, n, part, parts);
                let kv = cache.view(seqs[t], layer, from, to - from, 0..n_kv * hd);
                let (o, stats) = chunk.split_at_mut(q_dim);
                let q = &q[t * q_dim..(t + 1) * q_dim];
                SCORES.with_borrow_mut(|scores| {
                    c.attend_heads_partial(q, hd, n_kv, &kv, scale, scores, o, stats)
                });
            });
            let mut at = 0;
            for o in out.chunks_exact_mut(q_dim) {
                let parts = tasks[at].2;
                let mine = &buf[at * part_len..(at + parts) * part_len];
                let it = mine.chunks_exact(part_len).map(|p| p.split_at(q_dim));
                merge_partials(it, n_head, hd, o);
                at += parts;
            }
        });
    }
}

/// Keys per part, at least, when a lone token's attention is split along its keys.
const SPLIT_KEYS: usize = 256;

/// How many parts a lone token's `n` keys are attended in: a function of `n` alone, so the
/// arithmetic is the same whatever else is being decoded.
fn parts(n: usize) -> usize {
    if n >= 2 * SPLIT_KEYS {
        n / SPLIT_KEYS
    } else {
        1
    }
}

/// Part `part` of `parts` of the keys `first .. first + n`.
fn part_span(first: usize, n: usize, part: usize, parts: usize) -> (usize, usize) {
    (first + part * n / parts, first + (part + 1) * n / parts)
}

/// The first key position `pos` reads under an attention window (None: all of them).
fn first_key(window: Option<usize>, pos: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

thread_local! {
    /// Attention scores of the query head a pool thread is working on.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The tasks and unmerged parts of a split attention (the calling thread's).
    #[allow(clippy::type_complexity)]
    static SPLIT: std::cell::RefCell<(Vec<(usize, usize, usize)>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Activation buffers of one forward chunk of `n ≤ MAX_CHUNK` tokens, owned by whoever runs
/// the model and kept between calls so decoding allocates nothing; they grow to the largest
/// chunk seen.
#[derive(Default)]
pub struct Scratch {
    /// Residual stream (n, n_embd).
    x: Vec<f32>,
    /// Normed input of the attention or FFN (n, n_embd).
    h: Vec<f32>,
    /// Queries (n, n_head · head_dim).
    q: Vec<f32>,
    /// Keys and values of the chunk (n, n_head_kv · head_dim).
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output (n, n_head · head_dim).
    att: Vec<f32>,
    /// Output of the attention or FFN projection (n, n_embd).
    o: Vec<f32>,
    /// Gate (then GLU output) and up projections (n, n_ff).
    g: Vec<f32>,
    u: Vec<f32>,
    /// Rows that want logits, normed (wanted, n_embd).
    xs: Vec<f32>,
    /// Rotary sin/cos tables of the chunk's positions, at the index of the first layer with
    /// each distinct rotation (`Transformer::rope_table_of`); the others stay empty.
    rope_tables: Vec<Vec<f32>>,
}

impl Scratch {
    /// Bytes a runner's forward state holds at most for chunks of `n` tokens with `wanted`
    /// rows of logits: these buffers, the logits, and the compute context's quantized
    /// activations (8-bit with scales, twice for refined products) — the memory planner's
    /// figure, kept beside the buffers it counts.
    pub fn plan_bytes(hp: &HParams, n: usize, wanted: usize) -> u64 {
        let d = hp.n_embd;
        let widest = |f: &dyn Fn(&LayerShape) -> usize| hp.layers.iter().map(f).max().unwrap_or(0);
        let q_dim = widest(&|l| l.n_head * hp.head_dim);
        let kv_dim = widest(&|l| l.n_head_kv * hp.head_dim);
        let n_ff = widest(&|l| l.n_ff);
        // One sin/cos table per distinct rotation (Gemma 3: local and global).
        let mut ropes: Vec<&Rope> = Vec::new();
        for l in &hp.layers {
            if !ropes.contains(&&l.rope) {
                ropes.push(&l.rope);
            }
        }
        let floats = n * (3 * d + 2 * q_dim + 2 * kv_dim + 2 * n_ff)
            + wanted * d
            + n * ropes.iter().map(|r| r.n_rot).sum::<usize>()
            + wanted * hp.n_vocab;
        let activations = 2 * n * d.max(q_dim).max(n_ff) * 9 / 8;
        (4 * floats + activations) as u64
    }
}

/// The first `n` elements of `buf`, growing it if needed. Callers overwrite what they use.
fn fit(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// RMSNorm of every `w.len()`-wide row, rows spread over the pool in token-sized groups.
fn norm_rows(c: &Compute, x: &mut [f32], w: &[f32], eps: f32) {
    let group = w.len() * (x.len() / w.len()).div_ceil(4 * c.n_threads()).max(1);
    c.par_chunks_mut(x, group, &|_, rows| rms_norm(rows, w, eps));
}
