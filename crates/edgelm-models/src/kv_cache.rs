//! The KV cache: per sequence and layer, keys and values by position, in f32 (the precise path)
//! or f16 (the fast path, as llama.cpp keeps it: half the memory and bandwidth). Layers with a
//! sliding window keep a ring of `window + max_batch` slots, enough for any chunk the forward
//! pass writes before it reads.

use crate::hparams::HParams;
use crate::{ModelError, Result};
use edgelm_kernels::{KvRow, KvSpan, MAX_SPANS};
use half::f16;

/// How the cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    pub fn bytes(self) -> u64 {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// Keys and values of one layer, slot after slot, in the cache's type.
#[derive(Debug, Clone)]
enum Rows {
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// f16 bit patterns.
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
}

impl Rows {
    fn new(ty: KvType) -> Rows {
        match ty {
            KvType::F32 => Rows::F32 {
                k: Vec::new(),
                v: Vec::new(),
            },
            KvType::F16 => Rows::F16 {
                k: Vec::new(),
                v: Vec::new(),
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::F32 { k, .. } => k.len(),
            Rows::F16 { k, .. } => k.len(),
        }
    }

    fn resize(&mut self, n: usize) {
        match self {
            Rows::F32 { k, v } => {
                k.resize(n, 0.0);
                v.resize(n, 0.0);
            }
            Rows::F16 { k, v } => {
                k.resize(n, 0);
                v.resize(n, 0);
            }
        }
    }

    fn write(&mut self, at: usize, key: &[f32], value: &[f32]) {
        fn half(dst: &mut [u16], src: &[f32]) {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = f16::from_f32(*s).to_bits());
        }
        match self {
            Rows::F32 { k, v } => {
                k[at..at + key.len()].copy_from_slice(key);
                v[at..at + value.len()].copy_from_slice(value);
            }
            Rows::F16 { k, v } => {
                half(&mut k[at..at + key.len()], key);
                half(&mut v[at..at + value.len()], value);
            }
        }
    }

    fn row(&self, at: std::ops::Range<usize>) -> KvRow<'_> {
        match self {
            Rows::F32 { k, v } => KvRow::F32(&k[at.clone()], &v[at]),
            Rows::F16 { k, v } => KvRow::F16(&k[at.clone()], &v[at]),
        }
    }
}

#[derive(Debug, Clone)]
struct LayerKv {
    kv_dim: usize,
    /// Ring size for windowed layers; None keeps every position.
    ring: Option<usize>,
    /// Slots this layer may ever need (the context, or the ring).
    max_slots: usize,
    rows: Rows,
}

impl LayerKv {
    fn slot(&self, pos: usize) -> usize {
        self.ring.map_or(pos, |r| pos % r)
    }

    fn ensure(&mut self, pos: usize) {
        let need = (self.slot(pos) + 1) * self.kv_dim;
        if self.rows.len() < need {
            // Grow geometrically so long generations do not reallocate per token, never past
            // what the context can use.
            let cap = need.max(self.rows.len() * 2).max(64 * self.kv_dim);
            self.rows
                .resize(cap.min(self.max_slots * self.kv_dim).max(need));
        }
    }
}

#[derive(Debug, Clone)]
struct SeqKv {
    len: usize,
    layers: Vec<LayerKv>,
}

/// Keys and values of every sequence, for one model.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_ctx: usize,
    max_batch: usize,
    template: Vec<LayerKv>,
    seqs: Vec<SeqKv>,
}

impl KvCache {
    /// A cache for sequences of up to `n_ctx` positions. `max_batch` is the largest chunk one
    /// forward step writes per sequence (the model splits larger batches).
    pub fn new(hp: &HParams, n_ctx: usize, max_batch: usize, ty: KvType) -> KvCache {
        let max_batch = max_batch.max(1);
        let template = hp
            .layers
            .iter()
            .map(|l| {
                let ring = l.window.map(|w| w + max_batch).filter(|&r| r < n_ctx);
                LayerKv {
                    kv_dim: l.n_head_kv * hp.head_dim,
                    ring,
                    max_slots: ring.unwrap_or(n_ctx),
                    rows: Rows::new(ty),
                }
            })
            .collect();
        KvCache {
            n_ctx,
            max_batch,
            template,
            seqs: Vec::new(),
        }
    }

    /// Bytes the cache needs at most, for planning before anything is allocated.
    pub fn max_bytes(
        hp: &HParams,
        n_ctx: usize,
        max_batch: usize,
        n_seqs: usize,
        ty: KvType,
    ) -> u64 {
        let per_seq: u64 = hp
            .layers
            .iter()
            .map(|l| {
                let slots = l.window.map_or(n_ctx, |w| (w + max_batch).min(n_ctx));
                2 * slots as u64 * (l.n_head_kv * hp.head_dim) as u64 * ty.bytes()
            })
            .sum();
        per_seq * n_seqs as u64
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The most positions of one sequence a forward step may write (the model splits batches).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Positions stored for `seq` (0 for a sequence never written).
    pub fn seq_len(&self, seq: usize) -> usize {
        self.seqs.get(seq).map_or(0, |s| s.len)
    }

    /// Forget positions `len..` of `seq` (rejected drafts, re-prompting). Windowed layers cannot
    /// go back more than `max_batch + 1` positions (older keys are overwritten in their ring), so
    /// a deeper cut clears the sequence; callers check `seq_len` afterwards.
    pub fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(s) = self.seqs.get_mut(seq) {
            if len < s.len {
                // A ring of window + max_batch slots holds positions s.len - ring .. s.len; the
                // next step needs len - window + 1 .. len, so at most max_batch + 1 may be cut.
                let cut_ok = s.len - len <= self.max_batch + 1;
                let ring_ok = s.layers.iter().all(|l| l.ring.is_none() || cut_ok);
                s.len = if ring_ok { len } else { 0 };
            }
        }
    }

    /// Forget every sequence; the memory stays allocated for the next ones.
    pub fn clear(&mut self) {
        self.seqs.iter_mut().for_each(|s| s.len = 0);
    }

    /// Check that `positions` continue `seq` contiguously and fit the context.
    pub(crate) fn check_append(
        &mut self,
        seq: usize,
        first_pos: usize,
        count: usize,
    ) -> Result<()> {
        while self.seqs.len() <= seq {
            self.seqs.push(SeqKv {
                len: 0,
                layers: self.template.clone(),
            });
        }
        let len = self.seqs[seq].len;
        if first_pos != len {
            return Err(ModelError::Batch(format!(
                "sequence {seq} holds {len} positions, so its next token must be at position {len}, not {first_pos}"
            )));
        }
        if first_pos + count > self.n_ctx {
            return Err(ModelError::ContextFull {
                seq,
                needed: first_pos + count,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    pub(crate) fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.seqs[seq].layers[layer];
        l.ensure(pos);
        let s = l.slot(pos) * l.kv_dim;
        l.rows.write(s, &k[..l.kv_dim], &v[..l.kv_dim]);
    }

    pub(crate) fn set_len(&mut self, seq: usize, len: usize) {
        self.seqs[seq].len = len;
    }

    /// The cached rows of positions `first .. first + n` (columns `cols` of each), as at most
    /// [`MAX_SPANS`] runs of consecutive slots (two where a ring wraps), and how many there are.
    pub(crate) fn spans(
        &self,
        seq: usize,
        layer: usize,
        first: usize,
        n: usize,
        cols: std::ops::Range<usize>,
    ) -> ([KvSpan<'_>; MAX_SPANS], usize) {
        let l = &self.seqs[seq].layers[layer];
        let s0 = l.slot(first);
        let first_run = l.ring.map_or(n, |r| n.min(r - s0));
        let span = |slot: usize, n: usize| KvSpan {
            rows: l
                .rows
                .row(slot * l.kv_dim + cols.start..(slot + n.max(1) - 1) * l.kv_dim + cols.end),
            stride: l.kv_dim,
            n,
        };
        let head = span(s0, first_run);
        if first_run == n {
            return ([head; MAX_SPANS], 1);
        }
        ([head, span(0, n - first_run)], 2)
    }
}
