//! What a client asks of the engine and what it hears back.

use crate::sampler::SamplingParams;
use edgelm_grammar::Guide;
use std::time::Duration;

/// One request: a prompt and how to continue it (or, with `embed`, to embed it).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends a choice (not included in its output).
    pub stop: Vec<String>,
    /// Keep going past the model's end-of-generation tokens.
    pub ignore_eos: bool,
    /// Choices generated from the one prompt (they share its KV blocks).
    pub n: usize,
    /// Report each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first (disables prefix reuse:
    /// reused positions have no logits).
    pub prompt_logprobs: bool,
    /// Added to the logits of these tokens before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// A grammar the output must follow (JSON schema, tool calls); each choice gets its own
    /// copy of its state.
    pub guide: Option<Guide>,
    /// Embed the prompt instead of continuing it: the model's pooled final hidden state comes
    /// back as one [`Event::Embedding`] (then `Done`); nothing is sampled.
    pub embed: bool,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Request {
        Request {
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: false,
            n: 1,
            logprobs: None,
            prompt_logprobs: false,
            logit_bias: Vec::new(),
            guide: None,
            embed: false,
        }
    }

    /// An embedding of `prompt` (see [`Request::embed`]).
    pub fn embedding(prompt: Vec<u32>) -> Request {
        Request {
            embed: true,
            ..Request::new(prompt, 0, SamplingParams::default())
        }
    }
}

/// A token's log-probability under the model (log-softmax of the raw logits) and the most
/// likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The sequence filled the context.
    ContextFull,
}

/// Figures of one finished choice.
#[derive(Debug, Clone)]
pub struct SequenceStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    /// From admission to the end of the prefill.
    pub prompt_time: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
    /// After the first generated token.
    pub decode_time: Duration,
    pub tokens: Vec<u32>,
}

impl SequenceStats {
    /// Prompt tokens computed (not reused) per second of prefill.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// What the engine tells a request's client, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Log-probabilities of prompt tokens 1.. (each given those before it), if asked for.
    PromptLogprobs(Vec<TokenLogprob>),
    /// A generated token of choice `choice` and the text it completed (empty while a character
    /// or a possible stop string is still held back).
    Token {
        choice: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Choice `choice` ended; `text` is what was still held back.
    Done {
        choice: usize,
        text: String,
        reason: FinishReason,
        stats: SequenceStats,
    },
    /// The embedding of an embedding request's prompt: pooled as the model says, unit length.
    Embedding(Vec<f32>),
    /// The request failed after it was accepted; no more events follow.
    Error(String),
}

/// Where a request's events go. A sink whose client has gone answers `false` (or
/// `is_closed`), and the engine cancels the request at its next step.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn is_closed(&self) -> bool {
        false
    }
}

impl<F: FnMut(Event) -> bool + Send> Sink for F {
    fn send(&mut self, event: Event) -> bool {
        self(event)
    }
}
