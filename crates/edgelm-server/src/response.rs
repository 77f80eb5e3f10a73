//! From engine events to OpenAI responses: one [`Assembler`] per request turns the events of
//! its choices into SSE chunks as they come (streaming) or into one response object at the
//! end, in the shapes of chat completions and (legacy) completions, logprobs included.

use crate::api::Kind;
use crate::error::ApiError;
use axum::body::Bytes;
use edgelm_chat::tools::{ToolCall, ToolCallFormat, ToolCallParser, ToolEvent};
use edgelm_engine::{Event, FinishReason, SequenceStats, TokenLogprob};
use edgelm_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc::UnboundedReceiver;

/// Token texts as responses show them.
pub trait Vocab: Send + Sync {
    /// The bytes a token adds to the output text (nothing for control tokens).
    fn piece(&self, id: u32) -> &[u8];
    /// The token as logprobs name it (control tokens by their text, e.g. `<|im_end|>`).
    fn display(&self, id: u32) -> &[u8];
}

impl Vocab for Tokenizer {
    fn piece(&self, id: u32) -> &[u8] {
        self.token_piece_bytes(id).unwrap_or(&[])
    }

    fn display(&self, id: u32) -> &[u8] {
        self.token_piece_bytes_special(id).unwrap_or(&[])
    }
}

/// Characters a piece adds to a text: UTF-8 lead bytes, so a character split over tokens is
/// counted once, with the token that starts it.
fn chars_in(piece: &[u8]) -> usize {
    piece.iter().filter(|&&b| b & 0xC0 != 0x80).count()
}

/// OpenAI reports impossible tokens as -9999 rather than -inf (JSON has no infinity).
fn logprob_value(lp: f32) -> f64 {
    if lp.is_finite() {
        lp as f64
    } else {
        -9999.0
    }
}

/// The completions prompt returned before the completion (`echo`).
#[derive(Debug, Clone)]
pub struct Echo {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// What a response says besides the generated text.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    /// Log-probabilities were asked for (objects, not nulls).
    pub logprobs: bool,
    pub echo: Option<Echo>,
    pub include_usage: bool,
    /// Chat with tools: the syntax calls are parsed from.
    pub tools: Option<ToolCallFormat>,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// `logprobs` of a completions choice: four parallel lists.
#[derive(Debug, Default)]
struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl CompletionLogprobs {
    fn to_value(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }

    fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[derive(Debug, Default)]
struct Choice {
    /// The whole text (kept when not streaming).
    text: String,
    /// Characters of this choice's output so far, by token pieces (for `text_offset`).
    offset: usize,
    chat_logprobs: Vec<Value>,
    completion_logprobs: CompletionLogprobs,
    finish: Option<&'static str>,
    /// Tool calls are parsed out of the text as it comes.
    parser: Option<ToolCallParser>,
    /// Calls found so far (kept when not streaming), and how many.
    calls: Vec<ToolCall>,
    n_calls: usize,
}

pub struct Assembler {
    reply: Reply,
    vocab: Arc<dyn Vocab>,
    stream: bool,
    choices: Vec<Choice>,
    /// Completions with `echo`: prompt log-probabilities gathered until generation starts.
    prompt_logprobs: Vec<TokenLogprob>,
    echo_pending: bool,
    done: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl Assembler {
    pub fn new(reply: Reply, vocab: Arc<dyn Vocab>, stream: bool) -> Assembler {
        let choices = (0..reply.n)
            .map(|_| Choice {
                parser: reply.tools.map(ToolCallParser::new),
                ..Choice::default()
            })
            .collect();
        Assembler {
            echo_pending: reply.echo.is_some(),
            reply,
            vocab,
            stream,
            choices,
            prompt_logprobs: Vec::new(),
            done: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    fn token_str(&self, id: u32) -> String {
        String::from_utf8_lossy(self.vocab.display(id)).into_owned()
    }

    /// A chat `logprobs.content` entry.
    fn chat_entry(&self, lp: &TokenLogprob) -> Value {
        let alt = |id: u32, p: f32| {
            json!({
                "token": self.token_str(id),
                "logprob": logprob_value(p),
                "bytes": self.vocab.display(id),
            })
        };
        let mut entry = alt(lp.token, lp.logprob);
        entry["top_logprobs"] = lp.top.iter().map(|&(id, p)| alt(id, p)).collect();
        entry
    }

    /// A completions `top_logprobs` entry: token text → log-probability (texts that collide
    /// keep the likelier).
    fn top_map(&self, top: &[(u32, f32)]) -> Value {
        let mut m = Map::new();
        for &(id, p) in top {
            m.entry(self.token_str(id))
                .or_insert(json!(logprob_value(p)));
        }
        Value::Object(m)
    }

    /// Append one token to completions logprob lists, advancing the choice's text offset.
    fn push_completion_token(
        &self,
        lists: &mut CompletionLogprobs,
        offset: &mut usize,
        token: u32,
        lp: Option<&TokenLogprob>,
    ) {
        lists.tokens.push(json!(self.token_str(token)));
        lists
            .token_logprobs
            .push(lp.map_or(Value::Null, |l| json!(logprob_value(l.logprob))));
        lists
            .top_logprobs
            .push(lp.map_or(Value::Null, |l| self.top_map(&l.top)));
        lists.text_offset.push(json!(*offset));
        *offset += chars_in(self.vocab.piece(token));
    }

    fn chat_chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Value) -> Value {
        let mut c = json!({
            "id": self.reply.id,
            "object": "chat.completion.chunk",
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        });
        if self.reply.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn completion_chunk(&self, index: usize, text: &str, logprobs: Value, finish: Value) -> Value {
        let mut c = json!({
            "id": self.reply.id,
            "object": "text_completion",
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}],
        });
        if self.reply.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The chunks sent as soon as the request is accepted: the assistant role (chat), the
    /// echoed prompt when no prompt log-probabilities must be waited for (completions).
    pub fn start(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.stream {
            return;
        }
        match self.reply.kind {
            Kind::Chat => {
                for i in 0..self.reply.n {
                    let delta = json!({"role": "assistant", "content": ""});
                    out.push_back(sse(&self.chat_chunk(i, delta, Value::Null, Value::Null)));
                }
            }
            Kind::Completion if !self.reply.logprobs => self.flush_echo(out),
            Kind::Completion => {}
        }
    }

    /// Put the echoed prompt (and its log-probabilities) at the head of every choice.
    fn flush_echo(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.echo_pending {
            return;
        }
        self.echo_pending = false;
        let Some(echo) = self.reply.echo.clone() else {
            return;
        };
        for i in 0..self.choices.len() {
            let mut lists = CompletionLogprobs::default();
            let mut offset = self.choices[i].offset;
            if self.reply.logprobs {
                for (k, &t) in echo.tokens.iter().enumerate() {
                    // Position 0 has no log-probability: nothing precedes it.
                    let lp = k
                        .checked_sub(1)
                        .and_then(|j| self.prompt_logprobs.get(j))
                        .filter(|l| l.token == t);
                    self.push_completion_token(&mut lists, &mut offset, t, lp);
                }
            }
            // Generated tokens are offset from the end of the echoed text, whatever the pieces
            // of the prompt add up to (a leading space the tokenizer added, a BOS).
            self.choices[i].offset = echo.text.chars().count();
            let lp = if self.reply.logprobs {
                lists.to_value()
            } else {
                Value::Null
            };
            if self.stream {
                out.push_back(sse(&self.completion_chunk(i, &echo.text, lp, Value::Null)));
            } else {
                self.choices[i].text.push_str(&echo.text);
                self.choices[i].completion_logprobs = lists;
            }
        }
    }

    /// Take one event; SSE chunks go to `out` when streaming. Ok(true) once the request is
    /// complete (for streams, `[DONE]` is then in `out`).
    pub fn on_event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) -> Result<bool, ApiError> {
        match ev {
            Event::PromptLogprobs(lps) => self.prompt_logprobs.extend(lps),
            Event::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                self.flush_echo(out);
                self.on_token(choice, token, text, logprob, out);
            }
            Event::Done {
                choice,
                text,
                reason,
                stats,
            } => {
                self.flush_echo(out);
                return Ok(self.on_done(choice, text, reason, &stats, out));
            }
            // Only embedding requests hear these, and they are answered in `embeddings.rs`.
            Event::Embedding(_) => {}
            Event::Error(msg) => {
                let e = ApiError::internal(format!("generation failed: {msg}"));
                if !self.stream {
                    return Err(e);
                }
                out.push_back(sse(&e.body()));
                out.push_back(Bytes::from_static(DONE));
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The engine went away before the request completed.
    pub fn on_closed(&mut self, out: &mut VecDeque<Bytes>) -> ApiError {
        let e = ApiError::internal(
            "the engine stopped before this request completed; see the server's log",
        );
        if self.stream {
            out.push_back(sse(&e.body()));
            out.push_back(Bytes::from_static(DONE));
        }
        e
    }

    fn on_token(
        &mut self,
        choice: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        out: &mut VecDeque<Bytes>,
    ) {
        let Some(mut c) = self.choices.get_mut(choice).map(std::mem::take) else {
            return;
        };
        let lp = logprob.filter(|_| self.reply.logprobs);
        match self.reply.kind {
            Kind::Chat => {
                let entry = lp.as_ref().map(|l| self.chat_entry(l));
                match c.parser.as_mut() {
                    Some(parser) => {
                        // A call marker that is a control token renders as nothing; the parser
                        // needs its text.
                        let marker = self.vocab.piece(token).is_empty().then(|| {
                            let shown = String::from_utf8_lossy(self.vocab.display(token));
                            parser
                                .format()
                                .syntax_tokens()
                                .iter()
                                .find(|&&m| m == shown)
                                .copied()
                        });
                        let text = match marker.flatten() {
                            Some(m) => text + m,
                            None => text,
                        };
                        let events = parser.push(&text);
                        self.on_tool_events(choice, &mut c, events, entry, out);
                    }
                    None => self.chat_content(choice, &mut c, text, entry, out),
                }
            }
            Kind::Completion => {
                let mut lists = CompletionLogprobs::default();
                if lp.is_some() {
                    self.push_completion_token(&mut lists, &mut c.offset, token, lp.as_ref());
                }
                if self.stream {
                    if !text.is_empty() || !lists.is_empty() {
                        let logprobs = if lists.is_empty() {
                            Value::Null
                        } else {
                            lists.to_value()
                        };
                        out.push_back(sse(&self.completion_chunk(
                            choice,
                            &text,
                            logprobs,
                            Value::Null,
                        )));
                    }
                } else {
                    c.text.push_str(&text);
                    let all = &mut c.completion_logprobs;
                    all.tokens.append(&mut lists.tokens);
                    all.token_logprobs.append(&mut lists.token_logprobs);
                    all.top_logprobs.append(&mut lists.top_logprobs);
                    all.text_offset.append(&mut lists.text_offset);
                }
            }
        }
        self.choices[choice] = c;
    }

    /// Content text of a chat choice: a delta when streaming, kept otherwise.
    fn chat_content(
        &self,
        choice: usize,
        c: &mut Choice,
        text: String,
        entry: Option<Value>,
        out: &mut VecDeque<Bytes>,
    ) {
        if self.stream {
            if !text.is_empty() || entry.is_some() {
                let logprobs =
                    entry.map_or(Value::Null, |e| json!({"content": [e], "refusal": null}));
                let chunk =
                    self.chat_chunk(choice, json!({"content": text}), logprobs, Value::Null);
                out.push_back(sse(&chunk));
            }
        } else {
            c.text.push_str(&text);
            c.chat_logprobs.extend(entry);
        }
    }

    /// What the tool-call parser released: content as content, each complete call as
    /// `tool_calls` deltas — the first of an index with its id, type and name, then the
    /// arguments as string fragments — which is what OpenAI's client accumulators expect.
    fn on_tool_events(
        &self,
        choice: usize,
        c: &mut Choice,
        events: Vec<ToolEvent>,
        mut entry: Option<Value>,
        out: &mut VecDeque<Bytes>,
    ) {
        for ev in events {
            match ev {
                ToolEvent::Content(text) => self.chat_content(choice, c, text, entry.take(), out),
                ToolEvent::Call { index, call } => {
                    c.n_calls = c.n_calls.max(index + 1);
                    let id = call
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("call_{}_{choice}_{index}", self.reply.id));
                    if self.stream {
                        let head = json!({"tool_calls": [{"index": index, "id": id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]});
                        out.push_back(sse(&self.chat_chunk(
                            choice,
                            head,
                            Value::Null,
                            Value::Null,
                        )));
                        for fragment in argument_fragments(&call.arguments) {
                            let delta = json!({"tool_calls": [{"index": index,
                                "function": {"arguments": fragment}}]});
                            out.push_back(sse(&self.chat_chunk(
                                choice,
                                delta,
                                Value::Null,
                                Value::Null,
                            )));
                        }
                    } else {
                        c.calls.push(ToolCall {
                            id: Some(id),
                            ..call
                        });
                    }
                }
            }
        }
        // Log-probabilities of tokens still held back by the parser go with the next content.
        if let Some(e) = entry {
            c.chat_logprobs.push(e);
        }
    }

    fn on_done(
        &mut self,
        choice: usize,
        text: String,
        reason: FinishReason,
        stats: &SequenceStats,
        out: &mut VecDeque<Bytes>,
    ) -> bool {
        let mut reason = finish_reason(reason);
        let mut text = text;
        if let Some(mut c) = self.choices.get_mut(choice).map(std::mem::take) {
            if let Some(mut parser) = c.parser.take() {
                let mut events = parser.push(&text);
                events.extend(parser.finish());
                text.clear();
                self.on_tool_events(choice, &mut c, events, None, out);
                if c.n_calls > 0 && reason == "stop" {
                    reason = "tool_calls";
                }
            }
            self.choices[choice] = c;
        }
        if self.stream {
            let chunks = match self.reply.kind {
                Kind::Chat => [
                    (!text.is_empty()).then(|| {
                        self.chat_chunk(choice, json!({"content": text}), Value::Null, Value::Null)
                    }),
                    Some(self.chat_chunk(choice, json!({}), Value::Null, json!(reason))),
                ],
                Kind::Completion => [
                    (!text.is_empty())
                        .then(|| self.completion_chunk(choice, &text, Value::Null, Value::Null)),
                    Some(self.completion_chunk(choice, "", Value::Null, json!(reason))),
                ],
            };
            out.extend(chunks.iter().flatten().map(sse));
        }
        if let Some(c) = self.choices.get_mut(choice) {
            c.text.push_str(&text);
            if c.finish.replace(reason).is_none() {
                self.done += 1;
            }
        }
        // Choices share the prompt: count it once.
        self.prompt_tokens = stats.prompt_tokens;
        self.cached_tokens = self.cached_tokens.max(stats.reused_tokens);
        self.completion_tokens += stats.generated_tokens;
        let complete = self.done == self.choices.len();
        if complete && self.stream {
            if self.reply.include_usage {
                let mut last = match self.reply.kind {
                    Kind::Chat => self.chat_chunk(0, Value::Null, Value::Null, Value::Null),
                    Kind::Completion => self.completion_chunk(0, "", Value::Null, Value::Null),
                };
                last["choices"] = json!([]);
                last["usage"] = self.usage();
                out.push_back(sse(&last));
            }
            out.push_back(Bytes::from_static(DONE));
        }
        complete
    }

    fn usage(&self) -> Value {
        usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        )
    }

    /// The whole response of a request that did not stream.
    pub fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| match self.reply.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": chat_message(c),
                    "logprobs": if self.reply.logprobs {
                        json!({"content": c.chat_logprobs, "refusal": null})
                    } else {
                        Value::Null
                    },
                    "finish_reason": c.finish,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": if self.reply.logprobs {
                        c.completion_logprobs.to_value()
                    } else {
                        Value::Null
                    },
                    "finish_reason": c.finish,
                }),
            })
            .collect();
        json!({
            "id": self.reply.id,
            "object": match self.reply.kind {
                Kind::Chat => "chat.completion",
                Kind::Completion => "text_completion",
            },
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": choices,
            "usage": self.usage(),
        })
    }
}

/// A chat choice's message: its text, and its tool calls when it made any (content is then
/// null unless the model also wrote text).
fn chat_message(c: &Choice) -> Value {
    if c.calls.is_empty() {
        return json!({"role": "assistant", "content": c.text, "refusal": null});
    }
    let calls: Vec<Value> = c
        .calls
        .iter()
        .map(|call| {
            json!({"id": call.id, "type": "function",
                   "function": {"name": call.name, "arguments": call.arguments}})
        })
        .collect();
    let content = if c.text.trim().is_empty() {
        Value::Null
    } else {
        json!(c.text)
    };
    json!({"role": "assistant", "content": content, "refusal": null, "tool_calls": calls})
}

/// A call's arguments as streamed: pieces of about 16 characters split on character
/// boundaries, as a model's tokens would come (clients must concatenate them).
fn argument_fragments(arguments: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arguments;
    while !rest.is_empty() {
        let mut end = rest.len().min(16);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

/// A streamed response: SSE chunks made from the request's events as they arrive. Dropping it
/// (the client went away) drops the receiver, which the engine notices at its next step.
pub struct SseBody {
    rx: UnboundedReceiver<Event>,
    asm: Assembler,
    queue: VecDeque<Bytes>,
    finished: bool,
}

impl SseBody {
    pub fn new(rx: UnboundedReceiver<Event>, mut asm: Assembler) -> SseBody {
        let mut queue = VecDeque::new();
        asm.start(&mut queue);
        SseBody {
            rx,
            asm,
            queue,
            finished: false,
        }
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(ev)) => {
                    // Streams never fail here: errors become an SSE error event.
                    this.finished = this.asm.on_event(ev, &mut this.queue).unwrap_or(true);
                }
                Poll::Ready(None) => {
                    this.asm.on_closed(&mut this.queue);
                    this.finished = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Token i is the letter 'a' + i; token 9 is a control token shown as "<end>".
    struct Letters;

    const LETTERS: &[u8] = b"abcdefghi";

    impl Vocab for Letters {
        fn piece(&self, id: u32) -> &[u8] {
            LETTERS.get(id as usize..id as usize + 1).unwrap_or(&[])
        }
        fn display(&self, id: u32) -> &[u8] {
            match id {
                9 => b"<end>",
                10 => b"[TOOL_CALLS]",
                _ => self.piece(id),
            }
        }
    }

    fn reply(kind: Kind, n: usize, logprobs: bool, include_usage: bool) -> Reply {
        Reply {
            kind,
            id: "x-1".into(),
            created: 7,
            model: "m".into(),
            n,
            logprobs,
            echo: None,
            include_usage,
            tools: None,
        }
    }

    fn stats(prompt: usize, generated: usize, reused: usize) -> SequenceStats {
        SequenceStats {
            prompt_tokens: prompt,
            reused_tokens: reused,
            generated_tokens: generated,
            prompt_time: Duration::ZERO,
            time_to_first_token: Duration::ZERO,
            decode_time: Duration::ZERO,
            tokens: Vec::new(),
        }
    }

    fn token(choice: usize, token: u32, text: &str, lp: Option<TokenLogprob>) -> Event {
        Event::Token {
            choice,
            token,
            text: text.into(),
            logprob: lp,
        }
    }

    fn done(choice: usize, text: &str, reason: FinishReason, generated: usize) -> Event {
        Event::Done {
            choice,
            text: text.into(),
            reason,
            stats: stats(5, generated, 2),
        }
    }

    /// Run events through a streaming assembler; the SSE frames, split.
    fn stream(mut a: Assembler, events: Vec<Event>) -> Vec<String> {
        let mut out = VecDeque::new();
        a.start(&mut out);
        let mut complete = false;
        for e in events {
            assert!(!complete, "events after completion");
            complete = a.on_event(e, &mut out).unwrap();
        }
        assert!(complete);
        out.iter()
            .map(|b| {
                let s = std::str::from_utf8(b).unwrap();
                assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s:?}");
                s["data: ".len()..s.len() - 2].to_owned()
            })
            .collect()
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn chat_stream_with_usage() {
        let a = Assembler::new(reply(Kind::Chat, 1, false, true), Arc::new(Letters), true);
        let frames = stream(
            a,
            vec![
                token(0, 0, "a", None),
                token(0, 1, "", None), // held back: no chunk
                done(0, "b", FinishReason::Stop, 2),
            ],
        );
        assert_eq!(frames.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = frames[..frames.len() - 1]
            .iter()
            .map(|f| parse(f))
            .collect();
        assert_eq!(chunks.len(), 5, "{frames:?}");
        assert_eq!(
            chunks[0],
            json!({"id": "x-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}],
                   "usage": null})
        );
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "a"}));
        assert_eq!(chunks[2]["choices"][0]["delta"], json!({"content": "b"}));
        assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert!(chunks[..4].iter().all(|c| c["usage"].is_null()));
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
    }

    #[test]
    fn chat_stream_without_usage_has_no_usage_key() {
        let a = Assembler::new(reply(Kind::Chat, 2, false, false), Arc::new(Letters), true);
        let frames = stream(
            a,
            vec![
                token(1, 0, "a", None),
                done(1, "", FinishReason::ContextFull, 1),
                done(0, "", FinishReason::Length, 0),
            ],
        );
        let chunks: Vec<Value> = frames[..frames.len() - 1]
            .iter()
            .map(|f| parse(f))
            .collect();
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert!(chunks
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1));
        // Two role chunks, one content chunk, two finish chunks.
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[1]["choices"][0]["index"], 1);
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[4]["choices"][0]["index"], 0);
    }

    fn lp(token: u32, logprob: f32, top: &[(u32, f32)]) -> Option<TokenLogprob> {
        Some(TokenLogprob {
            token,
            logprob,
            top: top.to_vec(),
        })
    }

    #[test]
    fn chat_logprobs_shape() {
        let mut a = Assembler::new(reply(Kind::Chat, 1, true, false), Arc::new(Letters), false);
        let mut out = VecDeque::new();
        a.on_event(
            token(0, 2, "c", lp(2, -0.5, &[(2, -0.5), (9, -1.0)])),
            &mut out,
        )
        .unwrap();
        assert!(a
            .on_event(done(0, "", FinishReason::Stop, 1), &mut out)
            .unwrap());
        assert!(out.is_empty());
        let r = a.response();
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["content"], "c");
        assert_eq!(
            r["choices"][0]["logprobs"]["content"],
            json!([{"token": "c", "logprob": -0.5, "bytes": [99],
                    "top_logprobs": [{"token": "c", "logprob": -0.5, "bytes": [99]},
                                     {"token": "<end>", "logprob": -1.0,
                                      "bytes": [60, 101, 110, 100, 62]}]}])
        );
        assert_eq!(r["usage"]["completion_tokens"], 1);
    }

    #[test]
    fn completion_echo_with_prompt_logprobs() {
        let mut r = reply(Kind::Completion, 1, true, false);
        r.echo = Some(Echo {
            text: "abc".into(),
            tokens: vec![0, 1, 2],
        });
        let mut a = Assembler::new(r, Arc::new(Letters), false);
        let mut out = VecDeque::new();
        for e in [
            Event::PromptLogprobs(vec![lp(1, -1.0, &[(3, -0.25), (1, -1.0)]).unwrap()]),
            Event::PromptLogprobs(vec![lp(2, -2.0, &[]).unwrap()]),
            token(0, 3, "d", lp(3, -0.125, &[(3, -0.125)])),
            done(0, "", FinishReason::Length, 1),
        ] {
            a.on_event(e, &mut out).unwrap();
        }
        let r = a.response();
        let c = &r["choices"][0];
        assert_eq!(c["text"], "abcd");
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(
            c["logprobs"],
            json!({"tokens": ["a", "b", "c", "d"],
                   "token_logprobs": [null, -1.0, -2.0, -0.125],
                   "top_logprobs": [null, {"d": -0.25, "b": -1.0}, {}, {"d": -0.125}],
                   "text_offset": [0, 1, 2, 3]})
        );
    }

    #[test]
    fn completion_stream_chunks() {
        let mut r = reply(Kind::Completion, 1, false, true);
        r.echo = Some(Echo {
            text: "ab".into(),
            tokens: vec![0, 1],
        });
        let a = Assembler::new(r, Arc::new(Letters), true);
        let frames = stream(
            a,
            vec![token(0, 2, "c", None), done(0, "", FinishReason::Stop, 1)],
        );
        let chunks: Vec<Value> = frames[..frames.len() - 1]
            .iter()
            .map(|f| parse(f))
            .collect();
        assert_eq!(chunks[0]["object"], "text_completion");
        assert_eq!(chunks[0]["choices"][0]["text"], "ab");
        assert_eq!(chunks[1]["choices"][0]["text"], "c");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["total_tokens"], 6);
    }

    #[test]
    fn errors_after_streaming_began_are_sse_events() {
        let mut a = Assembler::new(reply(Kind::Chat, 1, false, false), Arc::new(Letters), true);
        let mut out = VecDeque::new();
        a.start(&mut out);
        out.clear();
        assert!(a.on_event(Event::Error("boom".into()), &mut out).unwrap());
        let first = std::str::from_utf8(&out[0]).unwrap();
        let v = parse(first.trim_start_matches("data: ").trim_end());
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("boom"));
        assert_eq!(&out[1][..], DONE);

        // Not streaming, the same error is the response.
        let mut a = Assembler::new(reply(Kind::Chat, 1, false, false), Arc::new(Letters), false);
        let e = a
            .on_event(Event::Error("boom".into()), &mut out)
            .unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    fn tool_events(text: &str, reason: FinishReason) -> Vec<Event> {
        // Pieces of 5 characters, as tokens would split the text.
        let chars: Vec<char> = text.chars().collect();
        let mut events: Vec<Event> = chars
            .chunks(5)
            .map(|c| token(0, 0, &c.iter().collect::<String>(), None))
            .collect();
        events.push(done(0, "", reason, events.len()));
        events
    }

    fn tool_reply() -> Reply {
        let mut r = reply(Kind::Chat, 1, false, false);
        r.tools = Some(ToolCallFormat::Hermes);
        r
    }

    const TWO_CALLS: &str = "Let me check.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {\"s\": \"é}\"}}\n</tool_call>";

    #[test]
    fn tool_calls_in_one_response() {
        let mut a = Assembler::new(tool_reply(), Arc::new(Letters), false);
        let mut out = VecDeque::new();
        for ev in tool_events(TWO_CALLS, FinishReason::Stop) {
            a.on_event(ev, &mut out).unwrap();
        }
        let v = a.response();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Let me check.");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "f");
        assert_eq!(calls[0]["type"], "function");
        let args: Value =
            serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"s": "é}"}));
        assert_ne!(calls[0]["id"], calls[1]["id"]);
    }

    #[test]
    fn streamed_tool_call_deltas_accumulate_to_the_response() {
        let a = Assembler::new(tool_reply(), Arc::new(Letters), true);
        let frames = stream(a, tool_events(TWO_CALLS, FinishReason::Stop));
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        let mut finish = Value::Null;
        for f in &frames[..frames.len() - 1] {
            let chunk = parse(f);
            let c = &chunk["choices"][0];
            if let Some(t) = c["delta"]["content"].as_str() {
                content.push_str(t);
            }
            for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = d["index"].as_u64().unwrap() as usize;
                if i == calls.len() {
                    // The first delta of an index names the call.
                    calls.push((
                        d["id"].as_str().unwrap().into(),
                        d["function"]["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                } else {
                    assert!(d.get("id").is_none() && d["function"].get("name").is_none());
                }
                calls[i]
                    .2
                    .push_str(d["function"]["arguments"].as_str().unwrap());
            }
            if !c["finish_reason"].is_null() {
                finish = c["finish_reason"].clone();
            }
        }
        assert_eq!(content, "Let me check.");
        assert_eq!(finish, "tool_calls");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].1, "f");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].2).unwrap(),
            json!({"x": 1})
        );
        assert_eq!(
            serde_json::from_str::<Value>(&calls[1].2).unwrap(),
            json!({"s": "é}"})
        );
    }

    #[test]
    fn a_garbled_call_is_content_and_stop() {
        let garbled = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": }\n</tool_call>";
        let mut a = Assembler::new(tool_reply(), Arc::new(Letters), false);
        let mut out = VecDeque::new();
        for ev in tool_events(garbled, FinishReason::Stop) {
            a.on_event(ev, &mut out).unwrap();
        }
        let v = a.response();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["message"]["content"], garbled);
        assert!(v["choices"][0]["message"].get("tool_calls").is_none());

        let a = Assembler::new(tool_reply(), Arc::new(Letters), true);
        let frames = stream(a, tool_events(garbled, FinishReason::Stop));
        let text: String = frames[..frames.len() - 1]
            .iter()
            .filter_map(|f| {
                parse(f)["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, garbled);
    }

    #[test]
    fn a_call_marker_that_is_a_control_token_reaches_the_parser() {
        let mut r = reply(Kind::Chat, 1, false, false);
        r.tools = Some(ToolCallFormat::Mistral);
        let mut a = Assembler::new(r, Arc::new(Letters), false);
        let mut out = VecDeque::new();
        // Token 10 is `[TOOL_CALLS]`, a control token: its text piece is empty.
        for ev in [
            token(0, 10, "", None),
            token(0, 0, "[{\"name\": \"f\", \"arguments\": {\"x\": 1}}]", None),
            done(0, "", FinishReason::Stop, 2),
        ] {
            a.on_event(ev, &mut out).unwrap();
        }
        let v = a.response();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "f"
        );
        assert!(v["choices"][0]["message"]["content"].is_null(), "{v}");
    }
}
