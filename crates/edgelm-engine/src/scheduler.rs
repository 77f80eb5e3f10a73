//! The step-wise engine. Requests wait in a queue, are admitted while sequences and KV memory
//! allow (adopting the longest cached prefix of their prompt), prefill in chunks, then decode
//! one token per step (an embedding request ends with its prefill: its pooled hidden state).
//! Every [`Scheduler::step`] is one forward pass over one batch: a token of every decoding
//! sequence plus prefill chunks of the others within a per-step token budget, so a long prompt
//! never stalls the rest. `run`, `chat`, `embed` and `serve` all drive this one loop.

use crate::sampler::Sampler;
use crate::sequence::{Event, FinishReason, Request, SequenceStats, Sink, TokenLogprob};
use crate::stop::StopMatcher;
use crate::{Engine, Result};
use edgelm_grammar::Guide;
use edgelm_models::{Batch, KvCache, KvConfig, KvStats, Logits, Pooling, Scratch, SeqId};
use edgelm_tokenizer::{StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// How a scheduler shares the machine between requests.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Positions one sequence may hold (0: the model's trained context).
    pub n_ctx: usize,
    /// Sequences running at once (a request's `n` choices count `n`).
    pub max_running: usize,
    /// Requests waiting for a place; more are refused.
    pub max_waiting: usize,
    /// Tokens one step may compute: a decode token per running sequence, the rest prefill.
    pub step_tokens: usize,
    /// Bytes of KV blocks (None: `n_ctx` positions for each running sequence).
    pub kv_budget: Option<u64>,
    pub prefix_cache: bool,
    /// When a generating sequence fills its context: None ends it (`ContextFull`); Some(keep)
    /// keeps its first `keep` positions, drops half of the rest and goes on (context shift).
    pub context_shift: Option<usize>,
}

impl SchedulerConfig {
    /// One request at a time, as `edgelm run` needs.
    pub fn single(n_ctx: usize) -> SchedulerConfig {
        SchedulerConfig {
            n_ctx,
            max_running: 1,
            max_waiting: 1,
            step_tokens: edgelm_models::MAX_CHUNK,
            kv_budget: None,
            prefix_cache: false,
            context_shift: None,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the prompt is empty: give at least one token of text")]
    EmptyPrompt,
    #[error("this model's maximum context length is {n_ctx} tokens, but the prompt has {prompt} tokens; shorten it or raise --ctx")]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error("{0}")]
    Invalid(String),
}

/// Counters since the scheduler started, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub prompt_tokens: u64,
    pub reused_tokens: u64,
    pub generated_tokens: u64,
    pub steps: u64,
}

struct Job {
    req: Request,
    sink: Box<dyn Sink>,
    submitted: Instant,
    /// Choices still running (0: the job is over).
    open: usize,
    cancelled: bool,
    /// How an embedding request pools its hidden states (None: a generation request).
    pooling: Option<Pooling>,
}

enum Phase {
    /// Prompt positions `..done` are in the cache.
    Prefill { done: usize },
    /// `next` was sampled and goes into the next batch.
    Decode { next: u32 },
}

/// One choice of a job, from admission to its end.
struct Sequence {
    job: usize,
    choice: usize,
    kv: SeqId,
    phase: Phase,
    /// Prompt and generated tokens (the penalties' history).
    tokens: Vec<u32>,
    generated: usize,
    sampler: Sampler,
    guide: Option<Guide>,
    decoder: StreamDecoder<Arc<Tokenizer>>,
    stops: StopMatcher,
    reused: usize,
    /// A stop string ended it (what the matcher holds is then dropped, not sent).
    stop_hit: bool,
    /// An embedding request's sum of the hidden states pooled so far (else empty).
    pooled: Vec<f32>,
    admitted: Instant,
    prefilled: Option<Instant>,
    first_token: Option<Instant>,
    /// Positions context shifts dropped (`tokens` keeps them for the penalties and the result).
    dropped: usize,
}

pub struct Scheduler {
    engine: Engine,
    cfg: SchedulerConfig,
    kv: KvCache,
    scratch: Scratch,
    logits: Logits,
    batch: Batch,
    jobs: Vec<Option<Job>>,
    waiting: VecDeque<usize>,
    /// In admission order, which is the order prefill budget is handed out.
    running: Vec<Sequence>,
    /// Per running sequence, its positions in the current batch.
    spans: Vec<Option<std::ops::Range<usize>>>,
    counters: Counters,
}

impl Scheduler {
    pub fn new(engine: Engine, mut cfg: SchedulerConfig) -> Result<Scheduler> {
        cfg.n_ctx = engine.context_length(cfg.n_ctx);
        cfg.max_running = cfg.max_running.max(1);
        cfg.step_tokens = cfg.step_tokens.max(cfg.max_running);
        let kv = KvCache::new(
            &engine.model.hp,
            KvConfig {
                max_seqs: cfg.max_running,
                budget: cfg.kv_budget,
                prefix_cache: cfg.prefix_cache,
                ..engine.kv_config(cfg.n_ctx)
            },
        )?;
        Ok(Scheduler {
            engine,
            cfg,
            kv,
            scratch: Scratch::default(),
            logits: Logits::default(),
            batch: Batch::new(),
            jobs: Vec::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            spans: Vec::new(),
            counters: Counters::default(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn n_ctx(&self) -> usize {
        self.cfg.n_ctx
    }

    pub fn kv_stats(&self) -> KvStats {
        self.kv.stats()
    }

    pub(crate) fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub(crate) fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.kv
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and not finished (choices count one each).
    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queue a request; its events go to `sink` as steps run.
    pub fn submit(
        &mut self,
        req: Request,
        sink: Box<dyn Sink>,
    ) -> std::result::Result<(), SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt.len() >= self.cfg.n_ctx {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt.len(),
                n_ctx: self.cfg.n_ctx,
            });
        }
        let n_vocab = self.engine.model.hp.n_vocab;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {t} is outside the vocabulary of {n_vocab}"
            )));
        }
        if let Some(&(t, _)) = req.logit_bias.iter().find(|b| b.0 as usize >= n_vocab) {
            return Err(SubmitError::Invalid(format!(
                "logit_bias names token {t}, outside the vocabulary of {n_vocab}"
            )));
        }
        if req.n == 0 || req.n > self.cfg.max_running {
            return Err(SubmitError::Invalid(format!(
                "n must be between 1 and {}, the sequences this engine runs at once",
                self.cfg.max_running
            )));
        }
        let pooling = if req.embed {
            if req.n != 1 || req.prompt_logprobs {
                return Err(SubmitError::Invalid(
                    "an embedding request has one result and no log-probabilities: set n to 1 \
                     and prompt_logprobs off"
                        .into(),
                ));
            }
            let pooling = self.engine.model.hp.pooling;
            Some(pooling.map_err(|e| SubmitError::Invalid(e.to_string()))?)
        } else {
            None
        };
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull(self.waiting.len()));
        }
        let job = Job {
            open: req.n,
            req,
            sink,
            submitted: Instant::now(),
            cancelled: false,
            pooling,
        };
        let id = match self.jobs.iter().position(Option::is_none) {
            Some(i) => {
                self.jobs[i] = Some(job);
                i
            }
            None => {
                self.jobs.push(Some(job));
                self.jobs.len() - 1
            }
        };
        self.waiting.push_back(id);
        Ok(())
    }

    /// Run steps until every request has finished.
    pub fn run_until_idle(&mut self) -> Result<()> {
        while !self.is_idle() {
            self.step()?;
        }
        Ok(())
    }

    /// One forward pass: drop cancelled work, admit what fits, run one batch, sample, stream.
    /// Returns the number of tokens computed (0: nothing to do). Errors are the engine's own
    /// (a bug, not a request's fault): the requests in the batch are told and dropped.
    pub fn step(&mut self) -> Result<usize> {
        self.drop_cancelled();
        self.admit();
        self.form_batch();
        if self.batch.is_empty() {
            return Ok(0);
        }
        let n = self.batch.len();
        let forward = self.engine.model.forward_into(
            &self.engine.compute,
            &self.batch,
            &mut self.kv,
            &mut self.scratch,
            &mut self.logits,
        );
        if let Err(e) = forward {
            let msg = format!("the engine failed on this batch: {e}");
            for s in std::mem::take(&mut self.running) {
                self.fail(s, &msg);
            }
            return Err(e.into());
        }
        self.counters.steps += 1;
        self.after_forward();
        Ok(n)
    }

    fn drop_cancelled(&mut self) {
        for job in self.jobs.iter_mut().flatten() {
            if job.sink.is_closed() {
                job.cancelled = true;
            }
        }
        let cancelled =
            |jobs: &[Option<Job>], j: usize| jobs[j].as_ref().is_none_or(|j| j.cancelled);
        let mut i = 0;
        while i < self.waiting.len() {
            let j = self.waiting[i];
            if cancelled(&self.jobs, j) {
                self.waiting.remove(i);
                self.jobs[j] = None;
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if cancelled(&self.jobs, self.running[i].job) {
                let s = self.running.remove(i);
                self.end(s);
            } else {
                i += 1;
            }
        }
    }

    /// Positions running sequences may still claim (prompt and `max_tokens` each).
    fn promised_positions(&self) -> usize {
        self.running
            .iter()
            .map(|s| {
                let job = self.jobs[s.job].as_ref().expect("running job");
                let total = (job.req.prompt.len() + job.req.max_tokens).min(self.cfg.n_ctx);
                total.saturating_sub(self.kv.seq_len(s.kv))
            })
            .sum()
    }

    /// Admit waiting requests in order while places and KV memory last; the first that does
    /// not fit waits (so none is overtaken for ever).
    fn admit(&mut self) {
        while let Some(&j) = self.waiting.front() {
            let job = self.jobs[j].as_ref().expect("waiting job");
            // Every choice is a running sequence (and holds a sliding window's blocks).
            if self.running.len() + job.req.n > self.cfg.max_running {
                return;
            }
            let need = (job.req.prompt.len() + job.req.max_tokens).min(self.cfg.n_ctx) * job.req.n;
            let free = self
                .kv
                .available_positions()
                .saturating_sub(self.promised_positions());
            // Block granularity: each sequence may waste most of a block.
            let need = need + job.req.n * self.kv.block_len();
            if need > free && !self.running.is_empty() {
                return;
            }
            self.waiting.pop_front();
            // Reused positions have no logits, nor hidden states.
            let (kv, reused) = if job.req.prompt_logprobs || job.pooling.is_some() {
                (self.kv.alloc(), 0)
            } else {
                self.kv.alloc_with_prefix(&job.req.prompt)
            };
            let sampling = job.req.sampling.clone();
            let tokens = job.req.prompt.clone();
            let stops = StopMatcher::new(job.req.stop.clone());
            self.counters.prompt_tokens += tokens.len() as u64;
            self.counters.reused_tokens += reused as u64;
            self.running.push(Sequence {
                job: j,
                choice: 0,
                kv,
                phase: Phase::Prefill { done: reused },
                tokens,
                generated: 0,
                sampler: Sampler::new(sampling),
                guide: job.req.guide.clone(),
                decoder: StreamDecoder::new(self.engine.tokenizer.clone()),
                stops,
                reused,
                stop_hit: false,
                pooled: match job.pooling {
                    Some(_) => vec![0.0; self.engine.model.hp.n_embd],
                    None => Vec::new(),
                },
                admitted: Instant::now(),
                prefilled: None,
                first_token: None,
                dropped: 0,
            });
        }
    }

    /// Decode tokens first (one per decoding sequence), then prefill chunks in admission order
    /// within what is left of the step's token budget.
    fn form_batch(&mut self) {
        self.batch.clear();
        self.spans.clear();
        self.spans.resize(self.running.len(), None);
        let mut budget = self.cfg.step_tokens;
        for (i, s) in self.running.iter().enumerate() {
            if let Phase::Decode { next } = s.phase {
                let at = self.batch.len();
                self.batch.push(next, self.kv.seq_len(s.kv), s.kv, true);
                self.spans[i] = Some(at..at + 1);
                budget = budget.saturating_sub(1);
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if let Phase::Prefill { done } = s.phase {
                let job = self.jobs[s.job].as_ref().expect("running job");
                let req = &job.req;
                let left = req.prompt.len() - done;
                let mut take = left.min(budget);
                // A prompt position never goes alone (lone positions take decoding's arithmetic,
                // runs block attention's): a chunk leaves at least two behind, and a budget of
                // one waits for the next step.
                if take + 1 == left && take > 1 {
                    take -= 1;
                }
                if take == 0 || take == 1 && left > 1 {
                    continue;
                }
                let at = self.batch.len();
                for (pos, &t) in req.prompt.iter().enumerate().skip(done).take(take) {
                    let last = pos + 1 == req.prompt.len();
                    match job.pooling {
                        Some(p) => {
                            let pooled = p.includes(pos, req.prompt.len());
                            self.batch.push_embd(t, pos, s.kv, pooled);
                        }
                        None => self.batch.push(t, pos, s.kv, last || req.prompt_logprobs),
                    }
                }
                self.spans[i] = Some(at..at + take);
                budget -= take;
            }
        }
    }

    /// Sample every sequence whose logits the pass produced; stream; fork the extra choices of
    /// prompts just prefilled; end what finished.
    fn after_forward(&mut self) {
        let now = Instant::now();
        let tokenizer = self.engine.tokenizer.clone();
        let n_ctx = self.cfg.n_ctx;
        let logits = &self.logits;
        let row_of = |b: usize| {
            let r = logits
                .batch_index
                .binary_search(&b)
                .expect("logits wanted for this batch position");
            logits.row(r)
        };
        let mut kept = Vec::with_capacity(self.running.len());
        let mut ended = Vec::new();
        let mut failed = Vec::new();
        let spans = std::mem::take(&mut self.spans);
        let running = std::mem::take(&mut self.running);
        for (mut s, span) in running.into_iter().zip(spans.iter().cloned()) {
            let Some(span) = span else {
                kept.push(s);
                continue;
            };
            let job = self.jobs[s.job].as_mut().expect("running job");
            if let (Some(pooling), Phase::Prefill { done }) = (job.pooling, &s.phase) {
                let len = job.req.prompt.len();
                for (pos, b) in (*done..).zip(span.clone()) {
                    if pooling.includes(pos, len) {
                        let r = logits
                            .embd_index
                            .binary_search(&b)
                            .expect("hidden state wanted for this batch position");
                        let row = logits.embd_row(r);
                        s.pooled.iter_mut().zip(row).for_each(|(p, x)| *p += x);
                    }
                }
                let done = done + span.len();
                if done < len {
                    s.phase = Phase::Prefill { done };
                    kept.push(s);
                    continue;
                }
                s.prefilled = Some(now);
                // Scaled to unit length, the sum points where the mean does: no count needed.
                let mut embedding = std::mem::take(&mut s.pooled);
                let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    embedding.iter_mut().for_each(|x| *x /= norm);
                }
                if !job.sink.send(Event::Embedding(embedding)) {
                    job.cancelled = true;
                }
                ended.push((s, FinishReason::Stop));
                continue;
            }
            let row = match s.phase {
                Phase::Decode { .. } => row_of(span.start),
                Phase::Prefill { done } => {
                    if job.req.prompt_logprobs {
                        let (prompt, top) = (&job.req.prompt, job.req.logprobs.unwrap_or(0));
                        let lp = (0..span.len())
                            .filter(|i| done + i + 1 < prompt.len())
                            .map(|i| {
                                token_logprob(row_of(span.start + i), prompt[done + i + 1], top)
                            })
                            .collect();
                        if !job.sink.send(Event::PromptLogprobs(lp)) {
                            job.cancelled = true;
                        }
                    }
                    let done = done + span.len();
                    if done < job.req.prompt.len() {
                        s.phase = Phase::Prefill { done };
                        kept.push(s);
                        continue;
                    }
                    s.prefilled = Some(now);
                    let row = row_of(span.end - 1);
                    // The other choices share the prompt's blocks and sample the same logits
                    // with their own seeds.
                    for choice in 1..job.req.n {
                        // Forking shares blocks and allocates none: it fails only for a
                        // sequence not allocated, which a running one always is.
                        let kv = self.kv.fork(s.kv).expect("a running sequence is allocated");
                        let mut sampling = job.req.sampling.clone();
                        sampling.seed = sampling.seed.wrapping_add(choice as u64);
                        let mut f = Sequence {
                            job: s.job,
                            choice,
                            kv,
                            phase: Phase::Prefill { done },
                            tokens: s.tokens.clone(),
                            generated: 0,
                            sampler: Sampler::new(sampling),
                            guide: job.req.guide.clone(),
                            decoder: StreamDecoder::new(tokenizer.clone()),
                            stops: StopMatcher::new(job.req.stop.clone()),
                            reused: s.reused,
                            stop_hit: false,
                            pooled: Vec::new(),
                            admitted: s.admitted,
                            prefilled: s.prefilled,
                            first_token: None,
                            dropped: s.dropped,
                        };
                        let end = sample_and_emit(
                            &tokenizer,
                            n_ctx,
                            &mut self.counters,
                            &mut f,
                            job,
                            row,
                            now,
                        );
                        match end {
                            Ok(Some(reason)) => ended.push((f, reason)),
                            Ok(None) => kept.push(f),
                            Err(msg) => failed.push((f, msg)),
                        }
                    }
                    row
                }
            };
            match sample_and_emit(&tokenizer, n_ctx, &mut self.counters, &mut s, job, row, now) {
                Ok(Some(reason)) => ended.push((s, reason)),
                Ok(None) => kept.push(s),
                Err(msg) => failed.push((s, msg)),
            }
        }
        self.spans = spans;
        for (mut s, reason) in ended {
            match (reason, self.cfg.context_shift) {
                (FinishReason::ContextFull, Some(keep)) => match self.shift_context(&mut s, keep) {
                    Ok(()) => kept.push(s),
                    Err(msg) => failed.push((s, msg)),
                },
                _ => self.finish(s, reason),
            }
        }
        self.running = kept;
        for (s, msg) in failed {
            self.fail(s, &msg);
        }
    }

    /// Make room in a full sequence: keep its first `keep` positions, drop half of the rest
    /// (whole blocks), move the others down (see `Model::shift_context`).
    fn shift_context(&mut self, s: &mut Sequence, keep: usize) -> std::result::Result<(), String> {
        let held = self.kv.seq_len(s.kv);
        let b = self.kv.block_len();
        let keep = keep.min(held);
        let discard = (held - keep) / 2 / b * b;
        if discard == 0 {
            return Err(format!(
                "the context is full and keeping {keep} of its {held} positions leaves nothing \
                 to drop; lower --keep or raise --ctx"
            ));
        }
        self.engine
            .model
            .shift_context(&mut self.kv, s.kv, keep, discard)
            .map_err(|e| e.to_string())?;
        s.dropped += discard;
        Ok(())
    }

    /// Tell the client a choice ended, and release its blocks.
    fn finish(&mut self, mut s: Sequence, reason: FinishReason) {
        let job = self.jobs[s.job].as_mut().expect("running job");
        let mut text = String::new();
        if !s.stop_hit {
            let (held, _) = s.stops.push(&s.decoder.flush());
            text = held + &s.stops.flush();
        }
        let end = Instant::now();
        let prefilled = s.prefilled.unwrap_or(end);
        let first = s.first_token.unwrap_or(end);
        let stats = SequenceStats {
            prompt_tokens: job.req.prompt.len(),
            reused_tokens: s.reused,
            generated_tokens: s.generated,
            prompt_time: prefilled - s.admitted,
            time_to_first_token: first - job.submitted,
            decode_time: end.saturating_duration_since(first),
            tokens: s.tokens.split_off(job.req.prompt.len()),
        };
        let _ = job.sink.send(Event::Done {
            choice: s.choice,
            text,
            reason,
            stats,
        });
        self.end(s);
    }

    fn fail(&mut self, s: Sequence, msg: &str) {
        if let Some(job) = self.jobs[s.job].as_mut() {
            if job.open > 0 {
                let _ = job.sink.send(Event::Error(msg.to_owned()));
                job.open = 1;
            }
        }
        self.end(s);
    }

    /// Free a sequence's blocks and, with its last choice, its job.
    fn end(&mut self, s: Sequence) {
        let _ = self.kv.free(s.kv);
        if let Some(job) = self.jobs[s.job].as_mut() {
            job.open = job.open.saturating_sub(1);
            if job.open == 0 || job.cancelled && !self.running.iter().any(|r| r.job == s.job) {
                self.jobs[s.job] = None;
            }
        }
    }
}

/// The log-softmax of `logits` at `token`, with the `top` most likely tokens.
fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        best = idx.iter().map(|&i| (i, logits[i as usize] - lse)).collect();
    }
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top: best,
    }
}

/// Sample the next token of `s` from `logits`, stream its text, and say whether the sequence
/// ended.
fn sample_and_emit(
    tokenizer: &Tokenizer,
    n_ctx: usize,
    counters: &mut Counters,
    s: &mut Sequence,
    job: &mut Job,
    logits: &[f32],
    now: Instant,
) -> std::result::Result<Option<FinishReason>, String> {
    let biased;
    let logits = if job.req.logit_bias.is_empty() {
        logits
    } else {
        let mut b = logits.to_vec();
        for &(t, bias) in &job.req.logit_bias {
            b[t as usize] += bias;
        }
        biased = b;
        &biased[..]
    };
    let mut token = s.sampler.sample(logits, &s.tokens);
    if let Some(guide) = s.guide.as_mut() {
        // Only a draw the grammar refuses pays for a mask (see `Constraint::allows`).
        if !guide.allows(token) {
            let mut masked = logits.to_vec();
            match guide.mask(&mut masked) {
                Ok(n) if n > 0 => token = s.sampler.sample(&masked, &s.tokens),
                Ok(_) => return Ok(Some(FinishReason::Stop)),
                Err(e) => return Err(format!("constrained decoding failed: {e}")),
            }
        }
    }
    s.first_token.get_or_insert(now);
    if !job.req.ignore_eos && tokenizer.is_eog(token) {
        return Ok(Some(FinishReason::Stop));
    }
    s.generated += 1;
    counters.generated_tokens += 1;
    s.tokens.push(token);
    let mut grammar_done = false;
    if let Some(guide) = s.guide.as_mut() {
        let piece = tokenizer
            .token_piece_bytes_special(token)
            .unwrap_or_default();
        if let Err(e) = guide.commit(token, piece) {
            return Err(format!("constrained decoding failed: {e}"));
        }
        grammar_done = guide.is_complete();
    }
    let logprob = job
        .req
        .logprobs
        .map(|top| token_logprob(logits, token, top));
    let (text, hit) = s.stops.push(&s.decoder.push(token));
    if !job.sink.send(Event::Token {
        choice: s.choice,
        token,
        text,
        logprob,
    }) {
        job.cancelled = true;
    }
    if hit {
        s.stop_hit = true;
        return Ok(Some(FinishReason::Stop));
    }
    if grammar_done {
        return Ok(Some(FinishReason::Stop));
    }
    if s.generated >= job.req.max_tokens {
        return Ok(Some(FinishReason::Length));
    }
    s.phase = Phase::Decode { next: token };
    if s.tokens.len() - s.dropped >= n_ctx {
        return Ok(Some(FinishReason::ContextFull));
    }
    Ok(None)
}
