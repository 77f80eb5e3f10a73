//! The KV cache: keys and values of many sequences in a pool of fixed-size blocks, each block
//! `block_len` positions of every layer of a layer group (layers that share an attention window).
//! Each sequence has a block table per group; attention reads a sequence's table, any length.
//!
//! - Sequences are allocated, forked (sharing every block, copied on the first write into a
//!   shared one), truncated and freed; the pool's size is fixed at creation by a byte budget.
//! - Sliding-window groups release the blocks a sequence's window has passed, so their memory is
//!   bounded however long the sequence.
//! - With the prefix cache on, every full block is indexed by the tokens it holds (a hash chain,
//!   `prefix.rs`); a new sequence adopts the longest cached prefix of its prompt, and blocks no
//!   sequence holds stay cached until a new block is needed, least recently released first.
//!
//! Block contents are immutable while shared: writes go only to a sequence's own, unindexed
//! blocks (the forward pass calls [`KvCache::reserve`] before writing).

mod prefix;
mod shift;
mod state;
mod store;

use crate::hparams::HParams;
use crate::{ModelError, Result, MAX_CHUNK};
use edgelm_kernels::{Compute, KvBlocks};
use prefix::{chain_key, Node, PrefixIndex, ROOT};
use store::Group;

/// A block-table entry whose block a sliding window released.
pub(crate) const HOLE: u32 = u32::MAX;

/// Positions per block unless configured otherwise: small enough that a chat turn re-prefills
/// little, large enough that a block of a 64-wide kv head is 2 KiB of f16 rows per layer.
pub const DEFAULT_BLOCK_LEN: usize = 16;

/// How the cache stores keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
    /// Blocks of 32 values as an f16 scale and 32 signed bytes (34 bytes).
    Q8_0,
    /// Blocks of 32 values as an f16 scale and 32 nibbles (18 bytes).
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 4] = [KvType::F32, KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// Bytes of `n` cached values (one row of keys or values; whole blocks for the quantized
    /// types).
    pub fn row_bytes(self, n: usize) -> u64 {
        let n = n as u64;
        match self {
            KvType::F32 => 4 * n,
            KvType::F16 => 2 * n,
            KvType::Q8_0 => n.div_ceil(32) * 34,
            KvType::Q4_0 => n.div_ceil(32) * 18,
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, KvType::Q8_0 | KvType::Q4_0)
    }

    /// The name llama.cpp's `--cache-type-k` uses.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<KvType, String> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown KV cache type {s:?}: use f32, f16, q8_0 or q4_0"))
    }
}

/// The types of the cached keys and values, and whether each is rotated first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
    /// Rotate every key head (and query head alike, so scores stay the same) by a normalized
    /// Walsh–Hadamard matrix before caching ([`key_rotation`]): outlier channels spread over
    /// the head, so quantized keys lose less.
    pub rotate_keys: bool,
    /// Rotate values the same way ([`value_rotation`]), and attention's output back.
    pub rotate_values: bool,
}

impl KvTypes {
    /// `k` keys and `v` values, each rotated where it is quantized (llama.cpp's default too).
    pub fn new(k: KvType, v: KvType) -> KvTypes {
        KvTypes {
            k,
            v,
            rotate_keys: k.is_quantized(),
            rotate_values: v.is_quantized(),
        }
    }
}

impl From<KvType> for KvTypes {
    fn from(ty: KvType) -> KvTypes {
        KvTypes::new(ty, ty)
    }
}

/// The Hadamard block keys turn by: the largest power of two dividing the head size (the whole
/// head for the usual 64 or 256).
pub fn key_rotation(head_dim: usize) -> usize {
    1 << head_dim.trailing_zeros()
}

/// The block values turn by: at most 64, which llama.cpp measured better for values than the
/// whole head.
pub fn value_rotation(head_dim: usize) -> usize {
    key_rotation(head_dim).min(64)
}

impl std::fmt::Display for KvTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.k == self.v {
            write!(f, "{}", self.k)?;
        } else {
            write!(f, "{} keys, {} values", self.k, self.v)?;
        }
        match (self.rotate_keys, self.rotate_values) {
            (true, true) => f.write_str(" (keys and values rotated)"),
            (true, false) => f.write_str(" (keys rotated)"),
            (false, true) => f.write_str(" (values rotated)"),
            (false, false) => Ok(()),
        }
    }
}

/// What a cache is built for.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// The most positions one sequence may hold.
    pub n_ctx: usize,
    pub types: KvTypes,
    /// Positions per block (a power of two).
    pub block_len: usize,
    /// Sequences alive at once (forks included): sizes the sliding-window pools.
    pub max_seqs: usize,
    /// Bytes for all blocks; None holds `n_ctx` positions for each of `max_seqs` sequences.
    pub budget: Option<u64>,
    /// Index full blocks by their tokens so later sequences reuse them.
    pub prefix_cache: bool,
}

impl KvConfig {
    /// One sequence of up to `n_ctx` positions, no prefix cache.
    pub fn new(n_ctx: usize, types: impl Into<KvTypes>) -> KvConfig {
        KvConfig {
            n_ctx,
            types: types.into(),
            block_len: DEFAULT_BLOCK_LEN,
            max_seqs: 1,
            budget: None,
            prefix_cache: false,
        }
    }
}

/// A sequence's handle in one cache.
pub type SeqId = usize;

/// Block counts of a cache, for metrics and planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvStats {
    pub block_len: usize,
    /// Blocks of every group.
    pub blocks: usize,
    /// Blocks some sequence holds.
    pub used: usize,
    /// Blocks no sequence holds, kept for the prefix cache (reused on demand).
    pub cached: usize,
    /// Positions of the full-attention pool: what all sequences together can hold.
    pub capacity: usize,
    pub sequences: usize,
}

#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    /// Per group, the block of positions `i·block_len ..`; `HOLE` where a window released it.
    tables: Vec<Vec<u32>>,
    /// Prefix-index keys of the full blocks (kept only with the prefix cache on).
    keys: Vec<u64>,
    /// A context shift moved keys computed beside dropped tokens: blocks from `keys.len()` on
    /// hold what no fresh run over the tokens would, so they are never indexed.
    shifted: bool,
}

/// Sizes of one layer group, derived from the model and the config alone.
struct GroupPlan {
    window: Option<usize>,
    layers: Vec<usize>,
    kv_dims: Vec<usize>,
    n_blocks: usize,
    block_bytes: u64,
}

#[derive(Debug)]
pub struct KvCache {
    cfg: KvConfig,
    groups: Vec<Group>,
    /// Per model layer: its group and its index among the group's layers.
    layer_slot: Vec<(usize, usize)>,
    seqs: Vec<Option<Seq>>,
    prefix: PrefixIndex,
    /// Ticks at every release, ordering evictions.
    clock: u64,
    /// Slots of the rows [`KvCache::write_rows`] stores, kept so a decoding step allocates
    /// nothing.
    slots: Vec<usize>,
}

impl KvCache {
    pub fn new(hp: &HParams, cfg: KvConfig) -> Result<KvCache> {
        let plans = Self::plan(hp, &cfg)?;
        let mut layer_slot = vec![(0, 0); hp.layers.len()];
        for (g, p) in plans.iter().enumerate() {
            for (i, &l) in p.layers.iter().enumerate() {
                layer_slot[l] = (g, i);
            }
        }
        let groups = plans
            .iter()
            .map(|p| Group::new(p.window, &p.kv_dims, p.n_blocks, cfg.block_len, cfg.types))
            .collect();
        Ok(KvCache {
            cfg,
            groups,
            layer_slot,
            seqs: Vec::new(),
            prefix: PrefixIndex::default(),
            clock: 0,
            slots: Vec::new(),
        })
    }

    /// Bytes a cache with `cfg` reserves for `hp`, for planning before anything is allocated.
    pub fn plan_bytes(hp: &HParams, cfg: &KvConfig) -> Result<u64> {
        Ok(Self::plan(hp, cfg)?
            .iter()
            .map(|p| p.n_blocks as u64 * p.block_bytes)
            .sum())
    }

    fn plan(hp: &HParams, cfg: &KvConfig) -> Result<Vec<GroupPlan>> {
        let b = cfg.block_len;
        if !b.is_power_of_two() || cfg.n_ctx == 0 || cfg.max_seqs == 0 {
            return Err(ModelError::KvConfig(format!(
                "block length {b} must be a power of two, and the context ({}) and sequence count ({}) at least 1",
                cfg.n_ctx, cfg.max_seqs
            )));
        }
        let t = cfg.types;
        if (t.k.is_quantized() || t.v.is_quantized()) && !hp.head_dim.is_multiple_of(32) {
            return Err(ModelError::KvConfig(format!(
                "a {t} KV cache stores blocks of 32 values, and this model's heads have {}; \
                 use f16",
                hp.head_dim
            )));
        }
        let mut plans: Vec<GroupPlan> = Vec::new();
        for (l, shape) in hp.layers.iter().enumerate() {
            // A window as long as the context never releases anything: it is a full layer.
            let window = shape.window.filter(|&w| w < cfg.n_ctx);
            let kv_dim = shape.n_head_kv * hp.head_dim;
            match plans.iter_mut().find(|p| p.window == window) {
                Some(p) => {
                    p.layers.push(l);
                    p.kv_dims.push(kv_dim);
                }
                None => plans.push(GroupPlan {
                    window,
                    layers: vec![l],
                    kv_dims: vec![kv_dim],
                    n_blocks: 0,
                    block_bytes: 0,
                }),
            }
        }
        let seq_blocks = cfg.n_ctx.div_ceil(b);
        let mut windowed_bytes = 0u64;
        for p in &mut plans {
            p.block_bytes = p
                .kv_dims
                .iter()
                .map(|&d| b as u64 * (t.k.row_bytes(d) + t.v.row_bytes(d)))
                .sum();
            if let Some(w) = p.window {
                // A forward chunk of at most MAX_CHUNK positions at p needs keys from
                // p + 1 - window on, and one block of slack is kept (`reserve_blocks`), so a
                // sequence holds at most this many blocks; as many again stay for the prefix
                // cache.
                let per_seq = ((w - 1 + MAX_CHUNK) / b + 3).min(seq_blocks);
                let copies = if cfg.prefix_cache { 2 } else { 1 };
                p.n_blocks = per_seq * cfg.max_seqs * copies;
                windowed_bytes += p.n_blocks as u64 * p.block_bytes;
            }
        }
        let full_bytes: u64 = plans
            .iter()
            .filter(|p| p.window.is_none())
            .map(|p| p.block_bytes)
            .sum();
        let full_blocks = match cfg.budget {
            None => seq_blocks * cfg.max_seqs,
            Some(budget) if full_bytes == 0 => {
                if budget < windowed_bytes {
                    return Err(budget_error(budget, windowed_bytes));
                }
                0
            }
            Some(budget) => {
                let n = budget.saturating_sub(windowed_bytes) / full_bytes;
                if n == 0 {
                    return Err(budget_error(budget, windowed_bytes + full_bytes));
                }
                n as usize
            }
        };
        for p in plans.iter_mut().filter(|p| p.window.is_none()) {
            p.n_blocks = full_blocks;
        }
        Ok(plans)
    }

    pub fn n_ctx(&self) -> usize {
        self.cfg.n_ctx
    }

    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }

    pub fn block_len(&self) -> usize {
        self.cfg.block_len
    }

    /// A new, empty sequence.
    pub fn alloc(&mut self) -> SeqId {
        let seq = Seq {
            tokens: Vec::new(),
            tables: vec![Vec::new(); self.groups.len()],
            keys: Vec::new(),
            shifted: false,
        };
        match self.seqs.iter().position(Option::is_none) {
            Some(id) => {
                self.seqs[id] = Some(seq);
                id
            }
            None => {
                self.seqs.push(Some(seq));
                self.seqs.len() - 1
            }
        }
    }

    /// A new sequence holding the longest cached prefix of `tokens` (whole blocks, and never
    /// the last two of `tokens`: the last must still be computed for its logits, in a run),
    /// and that length.
    pub fn alloc_with_prefix(&mut self, tokens: &[u32]) -> (SeqId, usize) {
        let id = self.alloc();
        if !self.cfg.prefix_cache || tokens.is_empty() {
            return (id, 0);
        }
        let b = self.cfg.block_len;
        let mut chain: Vec<(u64, Vec<u32>)> = Vec::new();
        let mut parent = ROOT;
        // At least two positions are left to compute: the prompt's last one must be attended
        // in a run, as it was when the prompt was first prefilled (see `Transformer::attention`).
        for block in tokens[..tokens.len().saturating_sub(2)].chunks_exact(b) {
            match self.prefix.get(parent, block) {
                Some((key, node)) => {
                    chain.push((key, node.blocks.clone()));
                    parent = key;
                }
                None => break,
            }
        }
        // The longest run whose every group still has the blocks the next position reads.
        let Some(k) = (1..=chain.len()).rev().find(|&k| {
            self.groups.iter().enumerate().all(|(g, group)| {
                (needed_from(group.window, k * b, b)..k).all(|i| chain[i].1[g] != HOLE)
            })
        }) else {
            return (id, 0);
        };
        let mut tables = vec![Vec::with_capacity(k); self.groups.len()];
        for (g, group) in self.groups.iter_mut().enumerate() {
            let from = needed_from(group.window, k * b, b);
            for (i, (_, blocks)) in chain[..k].iter().enumerate() {
                let blk = if i >= from { blocks[g] } else { HOLE };
                if blk != HOLE {
                    group.retain(blk);
                }
                tables[g].push(blk);
            }
        }
        let seq = self.seqs[id].as_mut().expect("just allocated");
        seq.tables = tables;
        seq.tokens = tokens[..k * b].to_vec();
        seq.keys = chain[..k].iter().map(|c| c.0).collect();
        (id, k * b)
    }

    /// A new sequence sharing every block of `seq` (copied when either writes into a shared one).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let s = self.seq(seq)?.clone();
        for (group, table) in self.groups.iter_mut().zip(&s.tables) {
            table
                .iter()
                .filter(|&&b| b != HOLE)
                .for_each(|&b| group.retain(b));
        }
        let id = self.alloc();
        self.seqs[id] = Some(s);
        Ok(id)
    }

    /// Drop `seq`; its blocks go back to the pool (or stay cached, if indexed).
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.seq(seq)?;
        let s = self.seqs[seq].take().expect("checked above");
        for (group, table) in self.groups.iter_mut().zip(&s.tables) {
            // Last blocks first, so the longest prefixes are the first evicted and a chain is
            // not cut above blocks that stay.
            for &b in table.iter().rev().filter(|&&b| b != HOLE) {
                self.clock += 1;
                group.release(b, self.clock);
            }
        }
        Ok(())
    }

    /// Free every sequence (cached blocks stay cached).
    pub fn clear(&mut self) {
        for id in 0..self.seqs.len() {
            if self.seqs[id].is_some() {
                let _ = self.free(id);
            }
        }
        self.seqs.clear();
    }

    /// Keep positions `..len` of `seq` (rejected drafts, an edited conversation). Fails, changing
    /// nothing, if `len` is beyond the sequence or a sliding window already released keys that
    /// position `len` would read.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let b = self.cfg.block_len;
        let s = self.seq(seq)?;
        let held = s.tokens.len();
        if len > held {
            return Err(ModelError::Truncate {
                seq,
                len,
                reason: format!("it holds only {held} positions"),
            });
        }
        for (group, table) in self.groups.iter().zip(&s.tables) {
            let from = needed_from(group.window, len, b);
            if table[from..len.div_ceil(b)].contains(&HOLE) {
                return Err(ModelError::Truncate {
                    seq,
                    len,
                    reason: format!(
                        "its sliding window ({} positions) released keys position {len} reads; start a new sequence instead",
                        group.window.unwrap_or(0)
                    ),
                });
            }
        }
        let s = self.seqs[seq].as_mut().expect("checked above");
        s.tokens.truncate(len);
        s.keys.truncate(len / b);
        for (group, table) in self.groups.iter_mut().zip(&mut s.tables) {
            for blk in table.drain(len.div_ceil(b)..).rev() {
                if blk != HOLE {
                    self.clock += 1;
                    group.release(blk, self.clock);
                }
            }
        }
        Ok(())
    }

    /// Positions `seq` holds (0 for a sequence not allocated).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs
            .get(seq)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.tokens.len())
    }

    /// The tokens whose keys and values `seq` holds.
    pub fn tokens(&self, seq: SeqId) -> &[u32] {
        self.seqs
            .get(seq)
            .and_then(Option::as_ref)
            .map_or(&[], |s| &s.tokens)
    }

    pub fn stats(&self) -> KvStats {
        let blocks = self.groups.iter().map(Group::n_blocks).sum();
        let cached = self.groups.iter().map(Group::n_evictable).sum();
        let available: usize = self.groups.iter().map(Group::available).sum();
        let capacity = self
            .groups
            .iter()
            .find(|g| g.window.is_none())
            .map_or(self.cfg.n_ctx * self.cfg.max_seqs, |g| {
                g.n_blocks() * self.cfg.block_len
            });
        KvStats {
            block_len: self.cfg.block_len,
            blocks,
            used: blocks - available,
            cached,
            capacity,
            sequences: self.seqs.iter().flatten().count(),
        }
    }

    /// Positions a new sequence could still get in the full-attention pool (free and cached
    /// blocks).
    pub fn available_positions(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| g.window.is_none())
            .map(|g| g.available() * self.cfg.block_len)
            .min()
            .unwrap_or(usize::MAX)
    }

    fn seq(&self, seq: SeqId) -> Result<&Seq> {
        self.seqs
            .get(seq)
            .and_then(Option::as_ref)
            .ok_or(ModelError::UnknownSequence(seq))
    }

    /// Check, changing nothing, that `count` positions from `first` continue `seq` and fit.
    pub(crate) fn check_append(&self, seq: SeqId, first: usize, count: usize) -> Result<()> {
        let len = self.seq(seq)?.tokens.len();
        if first != len {
            return Err(ModelError::Batch(format!(
                "sequence {seq} holds {len} positions, so its next token must be at position {len}, not {first}"
            )));
        }
        if first + count > self.cfg.n_ctx {
            return Err(ModelError::ContextFull {
                seq,
                needed: first + count,
                n_ctx: self.cfg.n_ctx,
            });
        }
        Ok(())
    }

    /// Give `seq` writable blocks for positions `first .. first + count` (`first` is its length):
    /// release what its windows passed, copy a shared last block, add new ones. On failure the
    /// sequence holds what it held before.
    pub(crate) fn reserve(&mut self, seq: SeqId, first: usize, count: usize) -> Result<()> {
        self.check_append(seq, first, count)?;
        if count == 0 {
            return Ok(());
        }
        let b = self.cfg.block_len;
        let mut s = self.seqs[seq].take().expect("checked above");
        let result = self.reserve_blocks(&mut s, first, count);
        if result.is_err() {
            // Back to whole blocks of what it holds: drop what this call added.
            for (group, table) in self.groups.iter_mut().zip(&mut s.tables) {
                for blk in table.drain(first.div_ceil(b)..) {
                    group.release(blk, 0);
                }
            }
        }
        self.seqs[seq] = Some(s);
        result
    }

    fn reserve_blocks(&mut self, s: &mut Seq, first: usize, count: usize) -> Result<()> {
        let b = self.cfg.block_len;
        for g in 0..self.groups.len() {
            let window = self.groups[g].window;
            let table = &mut s.tables[g];
            // One block of slack, so a sequence can always be cut back by a block's length
            // (rejected draft tokens) without losing keys its window still reads.
            let passed = needed_from(window, first.saturating_sub(b), b);
            for blk in &mut table[..passed.min(first.div_ceil(b))] {
                if *blk != HOLE {
                    self.clock += 1;
                    self.groups[g].release(*blk, self.clock);
                    *blk = HOLE;
                }
            }
            for i in first / b..=(first + count - 1) / b {
                if i < table.len() {
                    // The sequence's partly filled last block: copy it if anyone else sees it.
                    let old = table[i];
                    if self.groups[g].is_shared(old) {
                        let new = take_block(&mut self.groups, &mut self.prefix, g, b)?;
                        self.groups[g].copy_slots(old, new, first - i * b);
                        self.clock += 1;
                        self.groups[g].release(old, self.clock);
                        table[i] = new;
                    }
                } else {
                    table.push(take_block(&mut self.groups, &mut self.prefix, g, b)?);
                }
            }
        }
        Ok(())
    }

    /// Store position `pos` of layer `layer` for `seq` (blocks reserved beforehand), token by
    /// token with the scalar rounding: the reference [`KvCache::write_rows`] is tested against.
    #[cfg(test)]
    pub(crate) fn write(&mut self, seq: SeqId, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (g, i) = self.layer_slot[layer];
        let b = self.cfg.block_len;
        let blk = self.seqs[seq].as_ref().expect("reserved sequence").tables[g][pos / b];
        self.groups[g].write(i, blk as usize * b + pos % b, k, v);
    }

    /// [`KvCache::write`] for a chunk's tokens at once: token `t` of sequence `seqs[t]` at
    /// position `positions[t]`, its key and value rows `t` of `k` and `v`. Quantized caches
    /// encode the rows across `c`'s pool.
    pub(crate) fn write_rows(
        &mut self,
        c: &Compute,
        layer: usize,
        seqs: &[SeqId],
        positions: &[usize],
        k: &[f32],
        v: &[f32],
    ) {
        let (g, i) = self.layer_slot[layer];
        let b = self.cfg.block_len;
        self.slots.clear();
        self.slots
            .extend(seqs.iter().zip(positions).map(|(&seq, &pos)| {
                let table = &self.seqs[seq].as_ref().expect("reserved sequence").tables[g];
                table[pos / b] as usize * b + pos % b
            }));
        self.groups[g].write_rows(c, i, &self.slots, k, v);
    }

    /// Record the tokens just written for `seq`; with the prefix cache on, index the blocks
    /// they filled.
    pub(crate) fn append_tokens(&mut self, seq: SeqId, tokens: &[u32]) {
        let b = self.cfg.block_len;
        let s = self.seqs[seq].as_mut().expect("reserved sequence");
        let before = s.tokens.len() / b;
        s.tokens.extend_from_slice(tokens);
        if !self.cfg.prefix_cache || s.shifted {
            return;
        }
        for i in before..s.tokens.len() / b {
            let parent = if i == 0 { ROOT } else { s.keys[i - 1] };
            let block = &s.tokens[i * b..(i + 1) * b];
            let key = chain_key(parent, block);
            s.keys.push(key);
            let ours: Vec<u32> = s.tables.iter().map(|t| t[i]).collect();
            match self.prefix.node_mut(key) {
                // Already cached by another sequence: fill only blocks it lost.
                Some(node) if node.parent == parent && *node.tokens == *block => {
                    for (g, (theirs, &mine)) in node.blocks.iter_mut().zip(&ours).enumerate() {
                        if *theirs == HOLE
                            && mine != HOLE
                            && self.groups[g].cached_key(mine).is_none()
                        {
                            *theirs = mine;
                            self.groups[g].set_cached(mine, key);
                        }
                    }
                }
                // A colliding key of another prefix: leave it.
                Some(_) => {}
                None => {
                    for (g, &mine) in ours.iter().enumerate() {
                        if mine != HOLE {
                            self.groups[g].set_cached(mine, key);
                        }
                    }
                    self.prefix.insert(
                        key,
                        Node {
                            parent,
                            tokens: block.into(),
                            blocks: ours,
                        },
                    );
                }
            }
        }
    }

    /// The cached keys and values attention reads for `seq` at layer `layer`: positions
    /// `first .. first + n`, columns `cols` of each row.
    pub(crate) fn view(
        &self,
        seq: SeqId,
        layer: usize,
        first: usize,
        n: usize,
        cols: std::ops::Range<usize>,
    ) -> KvBlocks<'_> {
        let (g, i) = self.layer_slot[layer];
        let (keys, values, stride) = self.groups[g].planes(i, cols.start);
        KvBlocks {
            keys,
            values,
            stride,
            block_len: self.cfg.block_len,
            blocks: &self.seqs[seq].as_ref().expect("reserved sequence").tables[g],
            first,
            n,
        }
    }
}

/// The first block a sequence of `len` positions needs to go on (the next position reads keys
/// from `len + 1 - window`).
fn needed_from(window: Option<usize>, len: usize, block_len: usize) -> usize {
    window.map_or(0, |w| (len + 1).saturating_sub(w) / block_len)
}

/// A block of group `g`, evicting the least recently released cached one if none is free.
fn take_block(groups: &mut [Group], prefix: &mut PrefixIndex, g: usize, b: usize) -> Result<u32> {
    let (blk, evicted) = groups[g].take().ok_or(ModelError::KvFull {
        blocks: groups[g].n_blocks(),
        block_len: b,
    })?;
    if let Some(key) = evicted {
        prefix.forget_block(key, g);
    }
    Ok(blk)
}

fn budget_error(budget: u64, need: u64) -> ModelError {
    ModelError::KvConfig(format!(
        "a KV budget of {budget} bytes holds no block; this model needs at least {need} bytes (raise the budget)"
    ))
}

#[cfg(test)]
mod tests;
