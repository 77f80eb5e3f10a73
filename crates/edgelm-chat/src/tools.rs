//! Tool calls in a model's output: the text a model writes when it calls a function, turned into
//! OpenAI-style calls (`name` + `arguments` as a JSON object's text), whole or while streaming.
//!
//! Syntaxes ([`ToolCallFormat`]):
//! - Hermes / Qwen 2.5: `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>`, anywhere
//!   in the text, repeatable; text between calls is content. The closing tag may be missing at
//!   the end of the output or right before the next `<tool_call>`.
//! - Llama 3.x: the answer starts with a JSON object `{"name": "f", "parameters": {…}}` (or
//!   `"arguments"`), more of them may follow separated by whitespace or `;`; or
//!   `<|python_tag|>` (anywhere) followed by such JSON or by a built-in call
//!   `tool.call(key="value", …)` (name `tool`, the keyword arguments as the object).
//! - Mistral: `[TOOL_CALLS][{"name": "f", "arguments": {…}, "id": "…"}, …]` (v3) or
//!   `[TOOL_CALLS]f[ARGS]{…}` (v11+, repeatable, with an optional `[CALL_ID]id` before
//!   `[ARGS]`), anywhere in the text.
//! - Generic: the answer starts with `{"tool_calls": [{"name", "arguments"}, …]}`,
//!   `{"tool_call": {…}}` or `{"name": …, "arguments": …}`, optionally in a ```` ```json ````
//!   fence.
//!
//! A call is accepted only if its text is complete and valid: a JSON object with a non-empty
//! string `name` and `arguments` (or `parameters`) that is an object or a string holding one.
//! Anything else — malformed or truncated JSON, no name, non-object arguments — is content,
//! byte for byte: no text of the output is ever dropped except call syntax and whitespace-only
//! content next to calls.
//!
//! The streaming [`ToolCallParser`] gives exactly the events of [`parse_tool_calls`] for any
//! split of the text into chunks: it decides only what no later text can change, and holds the
//! rest (a possible marker start, an unfinished call, a JSON answer not yet closed).

use serde_json::{Map, Value};

/// A model's tool-call syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3,
    Mistral,
    Generic,
}

impl ToolCallFormat {
    /// The syntax a chat template teaches, from its source text: `<tool_call>` → Hermes;
    /// `[TOOL_CALLS]` → Mistral; `<|python_tag|>`, or Llama 3 header tokens
    /// (`<|start_header_id|>`) together with a `tools` section → Llama3; anything else →
    /// Generic.
    pub fn detect(template_source: &str) -> Self {
        let has = |s: &str| template_source.contains(s);
        if has("<tool_call>") {
            ToolCallFormat::Hermes
        } else if has("[TOOL_CALLS]") {
            ToolCallFormat::Mistral
        } else if has("<|python_tag|>") || (has("<|start_header_id|>") && has("tools")) {
            ToolCallFormat::Llama3
        } else {
            ToolCallFormat::Generic
        }
    }

    /// `"hermes"`, `"llama3"`, `"mistral"` or `"generic"`.
    pub fn name(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::Llama3 => "llama3",
            ToolCallFormat::Mistral => "mistral",
            ToolCallFormat::Generic => "generic",
        }
    }

    /// The format called [`name`](Self::name), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            ToolCallFormat::Hermes,
            ToolCallFormat::Llama3,
            ToolCallFormat::Mistral,
            ToolCallFormat::Generic,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }

    /// The text every call of this syntax opens with: `<tool_call>` (Hermes), `[TOOL_CALLS]`
    /// (Mistral). None for Llama3, whose `<|python_tag|>` is optional (a call may also be a
    /// bare JSON answer), and for Generic; so the absence of a marker in an output proves there
    /// is no call only when this is `Some`.
    pub fn call_marker(self) -> Option<&'static str> {
        match self {
            ToolCallFormat::Hermes | ToolCallFormat::Mistral => self.marker(),
            ToolCallFormat::Llama3 | ToolCallFormat::Generic => None,
        }
    }

    /// Every literal the parser recognizes as opening a call, anywhere in the text (includes
    /// Llama3's optional `<|python_tag|>`). These are special tokens for most models: the
    /// output must be detokenized with them rendered as text for the parser to see them.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolCallFormat::Hermes => &[HERMES_OPEN],
            ToolCallFormat::Mistral => &[MISTRAL_OPEN],
            ToolCallFormat::Llama3 => &[PYTHON_TAG],
            ToolCallFormat::Generic => &[],
        }
    }

    /// Every literal of the syntax that a vocabulary may hold as one control token (which
    /// detokenizes to nothing): a front end feeds these tokens' text to the parser.
    pub fn syntax_tokens(self) -> &'static [&'static str] {
        match self {
            ToolCallFormat::Hermes => &[HERMES_OPEN, HERMES_CLOSE],
            ToolCallFormat::Mistral => &[MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID],
            ToolCallFormat::Llama3 => &[PYTHON_TAG],
            ToolCallFormat::Generic => &[],
        }
    }

    fn marker(self) -> Option<&'static str> {
        self.markers().first().copied()
    }

    /// Whether a call may be a bare JSON object at the start of the answer (or right after a
    /// call), with no marker.
    fn bare_json(self) -> bool {
        // Hermes models also answer with a bare or fenced JSON call instead of `<tool_call>`
        // (Qwen2.5-Coder does); llama.cpp's Hermes parser takes those too.
        matches!(
            self,
            ToolCallFormat::Llama3 | ToolCallFormat::Generic | ToolCallFormat::Hermes
        )
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
const PYTHON_TAG: &str = "<|python_tag|>";
const FENCE: &str = "```";

/// One function call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The id the model gave the call (Mistral's `"id"` / `[CALL_ID]`), if any; the server
    /// makes one up otherwise.
    pub id: Option<String>,
    pub name: String,
    /// A JSON object, compact, keys in the model's order.
    pub arguments: String,
}

/// What the parser releases, in output order.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    /// Text that is not part of a call.
    Content(String),
    /// A complete, valid call; `index` counts calls from 0 in output order.
    Call { index: usize, call: ToolCall },
}

/// A whole output, split into content and calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    /// All content, concatenated; None when there is none.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl ParsedOutput {
    /// Collects streamed events (all of them, up to [`ToolCallParser::finish`]'s).
    pub fn from_events(events: impl IntoIterator<Item = ToolEvent>) -> Self {
        let mut content = String::new();
        let mut calls = Vec::new();
        for event in events {
            match event {
                ToolEvent::Content(text) => content.push_str(&text),
                ToolEvent::Call { call, .. } => calls.push(call),
            }
        }
        ParsedOutput {
            content: (!content.is_empty()).then_some(content),
            calls,
        }
    }
}

/// Batch form: the whole output at once. Same result as streaming it through a
/// [`ToolCallParser`].
pub fn parse_tool_calls(format: ToolCallFormat, text: &str) -> ParsedOutput {
    let mut parser = ToolCallParser::new(format);
    let mut events = parser.push(text);
    events.extend(parser.finish());
    ParsedOutput::from_events(events)
}

/// Streaming parser: feed the output as it is generated.
///
/// Whitespace-only content between, before or after calls is dropped once the output has a
/// call (it is layout, e.g. the newline between two `<tool_call>` blocks); content with other
/// text is released verbatim. An output without calls comes out unchanged.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    /// Text received and not yet decided.
    buf: String,
    mode: Mode,
    /// The JSON scan under way in `buf` (at the offset given), kept across pushes so a long
    /// call is scanned once, not once per chunk.
    scan: Option<(usize, JsonScan)>,
    out: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Llama3 / Generic, where a bare JSON call may begin: the start of the output or right
    /// after a call (`after_call`: a `;` may then separate the next one).
    Start { after_call: bool },
    /// Plain text: only a marker opens a call.
    Text,
}

/// The decision about the start of the undecided text.
enum Step {
    /// Not decidable until more text arrives.
    Wait,
    /// The first n bytes are content.
    Content(usize),
    /// The first n bytes are these calls.
    Calls(Vec<ToolCall>, usize),
    /// No bare JSON call here: go on as plain text, consuming nothing.
    ToText,
}

impl ToolCallParser {
    pub fn new(format: ToolCallFormat) -> Self {
        let mode = if format.bare_json() {
            Mode::Start { after_call: false }
        } else {
            Mode::Text
        };
        ToolCallParser {
            format,
            buf: String::new(),
            mode,
            scan: None,
            out: Output::default(),
        }
    }

    pub fn format(&self) -> ToolCallFormat {
        self.format
    }

    /// Calls released so far.
    pub fn call_count(&self) -> usize {
        self.out.calls
    }

    /// Feeds generated text as it arrives; returns what can be released now: content that can
    /// no longer be part of a call (text that might start a marker or a JSON call is held
    /// back), and each call as soon as it is complete and valid.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        self.run(false);
        std::mem::take(&mut self.out.events)
    }

    /// End of output: decides what was held back (an unfinished call is content) and returns
    /// the last events.
    pub fn finish(mut self) -> Vec<ToolEvent> {
        self.run(true);
        // At the end every step decides, so nothing is left; kept as content if a bug left any.
        debug_assert!(self.buf.is_empty(), "undecided at the end: {:?}", self.buf);
        let rest = std::mem::take(&mut self.buf);
        self.out.content(&rest);
        self.out.end();
        self.out.events
    }

    fn run(&mut self, end: bool) {
        while !self.buf.is_empty() {
            let mut cx = Cx {
                buf: &self.buf,
                end,
                scan: &mut self.scan,
            };
            let step = match self.mode {
                Mode::Start { after_call } => start_step(self.format, after_call, &mut cx),
                Mode::Text => text_step(self.format, &mut cx),
            };
            match step {
                Step::Wait => return,
                Step::Content(n) => {
                    self.out.content(&self.buf[..n]);
                    self.consume(n);
                }
                Step::Calls(calls, n) => {
                    self.consume(n);
                    for call in calls {
                        self.out.call(call);
                    }
                    self.mode = if self.format.bare_json() {
                        Mode::Start { after_call: true }
                    } else {
                        Mode::Text
                    };
                }
                Step::ToText => {
                    self.mode = Mode::Text;
                    self.scan = None;
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.scan = None;
    }
}

/// The events being produced, with the whitespace rule applied.
#[derive(Debug, Default)]
struct Output {
    events: Vec<ToolEvent>,
    calls: usize,
    /// Whether the content since the last call (or the start) has non-whitespace text.
    run_has_text: bool,
    /// Whitespace at the start of the current run: released with the first text after it,
    /// dropped if a call comes first (or the output ends after a call).
    pending_ws: String,
}

impl Output {
    fn content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.run_has_text {
            if text.chars().all(char::is_whitespace) {
                self.pending_ws.push_str(text);
                return;
            }
            self.run_has_text = true;
            let ws = std::mem::take(&mut self.pending_ws);
            self.push_content(&ws);
        }
        self.push_content(text);
    }

    fn push_content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(ToolEvent::Content(last)) = self.events.last_mut() {
            last.push_str(text);
        } else {
            self.events.push(ToolEvent::Content(text.to_owned()));
        }
    }

    fn call(&mut self, call: ToolCall) {
        self.pending_ws.clear();
        self.run_has_text = false;
        self.events.push(ToolEvent::Call {
            index: self.calls,
            call,
        });
        self.calls += 1;
    }

    fn end(&mut self) {
        if self.calls == 0 {
            let ws = std::mem::take(&mut self.pending_ws);
            self.push_content(&ws);
        }
    }
}

/// Why an attempt at reading a call gave none.
enum NoCall {
    /// The text so far could still become the call.
    Wait,
    /// It is not a call (or the output ended before it was complete).
    Fail,
}

type Attempt = Result<(Vec<ToolCall>, usize), NoCall>;

/// The undecided text and what a step needs to read it.
struct Cx<'a> {
    buf: &'a str,
    /// No more text will come.
    end: bool,
    scan: &'a mut Option<(usize, JsonScan)>,
}

impl Cx<'_> {
    /// The text ran out: wait for more, or at the end give up.
    fn more(&self) -> NoCall {
        if self.end {
            NoCall::Fail
        } else {
            NoCall::Wait
        }
    }

    /// Requires `word` at `at`; returns the offset after it.
    fn expect(&self, at: usize, word: &str) -> Result<usize, NoCall> {
        match lit(self.buf, at, word) {
            Lit::Full => Ok(at + word.len()),
            Lit::Partial => Err(self.more()),
            Lit::No => Err(NoCall::Fail),
        }
    }

    /// The JSON object (or, if `open` allows, array) starting at `at`, and the offset after it.
    fn json(&mut self, at: usize, open: &[u8]) -> Result<(Value, usize), NoCall> {
        let Some(&first) = self.buf.as_bytes().get(at) else {
            return Err(self.more());
        };
        if !open.contains(&first) {
            return Err(NoCall::Fail);
        }
        let bytes = &self.buf.as_bytes()[at..];
        let scan = match self.scan {
            Some((start, scan)) if *start == at => scan.advance(bytes),
            _ => {
                let mut scan = JsonScan::default();
                let result = scan.advance(bytes);
                *self.scan = Some((at, scan));
                result
            }
        };
        match scan {
            Scan::More => Err(self.more()),
            Scan::Invalid => Err(NoCall::Fail),
            Scan::Done(len) => serde_json::from_str(&self.buf[at..at + len])
                .map(|v| (v, at + len))
                .map_err(|_| NoCall::Fail),
        }
    }
}

fn text_step(format: ToolCallFormat, cx: &mut Cx) -> Step {
    let Some(marker) = format.marker() else {
        return Step::Content(cx.buf.len());
    };
    if cx.buf.starts_with(marker) {
        let attempt = match format {
            ToolCallFormat::Hermes => hermes_call(cx),
            ToolCallFormat::Mistral => mistral_calls(cx),
            ToolCallFormat::Llama3 => python_tag_call(cx),
            ToolCallFormat::Generic => Err(NoCall::Fail),
        };
        return match attempt {
            Ok((calls, n)) => Step::Calls(calls, n),
            Err(NoCall::Wait) => Step::Wait,
            // The marker is text; look for the next one after it.
            Err(NoCall::Fail) => Step::Content(marker.len()),
        };
    }
    if let Some(i) = cx.buf.find(marker) {
        return Step::Content(i);
    }
    // Hold a tail that may be the start of a marker (markers are ASCII, so the cut is on a
    // char boundary).
    let hold = if cx.end {
        0
    } else {
        (1..marker.len())
            .rev()
            .find(|&k| cx.buf.as_bytes().ends_with(&marker.as_bytes()[..k]))
            .unwrap_or(0)
    };
    match cx.buf.len() - hold {
        0 => Step::Wait,
        n => Step::Content(n),
    }
}

fn start_step(format: ToolCallFormat, after_call: bool, cx: &mut Cx) -> Step {
    let first = skip_ws(cx.buf, 0);
    if first > 0 {
        // Leading whitespace: the output sink holds it until it knows what follows.
        return Step::Content(first);
    }
    let attempt = match cx.buf.as_bytes()[0] {
        b'{' => bare_json_calls(format, cx, 0),
        b';' if after_call => {
            let at = skip_ws(cx.buf, 1);
            bare_json_calls(format, cx, at)
        }
        b'`' if matches!(format, ToolCallFormat::Generic | ToolCallFormat::Hermes) => {
            fenced_calls(cx)
        }
        _ => Err(NoCall::Fail),
    };
    match attempt {
        Ok((calls, n)) => Step::Calls(calls, n),
        Err(NoCall::Wait) => Step::Wait,
        Err(NoCall::Fail) => Step::ToText,
    }
}

/// `<tool_call>` JSON `</tool_call>`; the closing tag may be missing before the next
/// `<tool_call>` or at the end of the output.
fn hermes_call(cx: &mut Cx) -> Attempt {
    let at = skip_ws(cx.buf, HERMES_OPEN.len());
    let (value, end) = cx.json(at, b"{")?;
    let call = call_from_value(value, false).ok_or(NoCall::Fail)?;
    let after = skip_ws(cx.buf, end);
    match (
        lit(cx.buf, after, HERMES_CLOSE),
        lit(cx.buf, after, HERMES_OPEN),
    ) {
        (Lit::Full, _) => Ok((vec![call], after + HERMES_CLOSE.len())),
        // What follows the JSON is left as text (whitespace, dropped, or the next call).
        (_, Lit::Full) => Ok((vec![call], end)),
        (Lit::Partial, _) | (_, Lit::Partial) if cx.end => Ok((vec![call], end)),
        (Lit::Partial, _) | (_, Lit::Partial) => Err(NoCall::Wait),
        (Lit::No, Lit::No) => Err(NoCall::Fail),
    }
}

/// `[TOOL_CALLS]` followed by a JSON array of calls (or one call object), or by
/// `name[ARGS]{…}` / `name[CALL_ID]id[ARGS]{…}`.
fn mistral_calls(cx: &mut Cx) -> Attempt {
    let at = skip_ws(cx.buf, MISTRAL_OPEN.len());
    let Some(&first) = cx.buf.as_bytes().get(at) else {
        return Err(cx.more());
    };
    if first == b'[' || first == b'{' {
        let (value, end) = cx.json(at, b"[{")?;
        let calls = match value {
            Value::Array(items) => items
                .into_iter()
                .map(|v| call_from_value(v, false))
                .collect::<Option<Vec<_>>>()
                .filter(|calls| !calls.is_empty()),
            object => call_from_value(object, false).map(|c| vec![c]),
        };
        return calls.map(|c| (c, end)).ok_or(NoCall::Fail);
    }
    let name_end = take_while(cx.buf, at, |c| c.is_alphanumeric() || "_-.".contains(c));
    if name_end == at {
        return Err(NoCall::Fail);
    }
    let mut next = name_end;
    let mut id = None;
    match lit(cx.buf, next, MISTRAL_CALL_ID) {
        Lit::Full => {
            let id_start = next + MISTRAL_CALL_ID.len();
            let id_end = take_while(cx.buf, id_start, |c| c.is_ascii_alphanumeric());
            if id_end == cx.buf.len() {
                return Err(cx.more());
            }
            if id_end == id_start {
                return Err(NoCall::Fail);
            }
            id = Some(cx.buf[id_start..id_end].to_owned());
            next = id_end;
        }
        // Also covers the end of the text (a name still growing) and a lone `[`.
        Lit::Partial => return Err(cx.more()),
        Lit::No => {}
    }
    let args_at = skip_ws(cx.buf, cx.expect(next, MISTRAL_ARGS)?);
    let (value, end) = cx.json(args_at, b"{")?;
    let Value::Object(args) = value else {
        return Err(NoCall::Fail);
    };
    let call = ToolCall {
        id,
        name: cx.buf[at..name_end].to_owned(),
        arguments: Value::Object(args).to_string(),
    };
    Ok((vec![call], end))
}

/// `<|python_tag|>` followed by a JSON call or a built-in call `name.call(key=value, …)`.
fn python_tag_call(cx: &mut Cx) -> Attempt {
    let at = skip_ws(cx.buf, PYTHON_TAG.len());
    let Some(&first) = cx.buf.as_bytes().get(at) else {
        return Err(cx.more());
    };
    if first == b'{' {
        let (value, end) = cx.json(at, b"{")?;
        let call = call_from_value(value, false).ok_or(NoCall::Fail)?;
        return Ok((vec![call], end));
    }
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return Err(NoCall::Fail);
    }
    let name_end = take_while(cx.buf, at, |c| c.is_ascii_alphanumeric() || c == '_');
    let args_start = cx.expect(name_end, ".call(")?;
    let Some(close) = python_call_end(cx.buf, args_start) else {
        return Err(cx.more());
    };
    let args = parse_python_kwargs(&cx.buf[args_start..close]).ok_or(NoCall::Fail)?;
    let call = ToolCall {
        id: None,
        name: cx.buf[at..name_end].to_owned(),
        arguments: Value::Object(args).to_string(),
    };
    Ok((vec![call], close + 1))
}

/// A JSON call answer at `at` (Llama3: a call object; Generic: also its wrappers).
fn bare_json_calls(format: ToolCallFormat, cx: &mut Cx, at: usize) -> Attempt {
    let (value, end) = cx.json(at, b"{")?;
    let calls = match format {
        ToolCallFormat::Generic => generic_calls(value),
        // Without a marker, `arguments` must be present: `{"name": "Bob"}` is more likely an
        // answer than a call.
        _ => call_from_value(value, true).map(|c| vec![c]),
    };
    calls.map(|c| (c, end)).ok_or(NoCall::Fail)
}

/// Generic: ```` ```json ```` (or a bare ```` ``` ````), a JSON call answer, ```` ``` ````
/// (which may be missing at the end of the output).
fn fenced_calls(cx: &mut Cx) -> Attempt {
    let mut at = cx.expect(0, FENCE)?;
    match lit_ascii_ci(cx.buf, at, "json") {
        Lit::Full => at += 4,
        Lit::Partial => return Err(cx.more()),
        Lit::No => {}
    }
    let at = skip_ws(cx.buf, at);
    let (value, end) = cx.json(at, b"{")?;
    let calls = generic_calls(value).ok_or(NoCall::Fail)?;
    let after = skip_ws(cx.buf, end);
    match lit(cx.buf, after, FENCE) {
        Lit::Full => Ok((calls, after + FENCE.len())),
        Lit::Partial if cx.end => Ok((calls, end)),
        Lit::Partial => Err(NoCall::Wait),
        Lit::No => Err(NoCall::Fail),
    }
}

/// `{"tool_calls": [call, …]}`, `{"tool_call": call}` (each the object's only key) or a call.
fn generic_calls(value: Value) -> Option<Vec<ToolCall>> {
    let Value::Object(mut object) = value else {
        return None;
    };
    if object.len() == 1 {
        // The wrapper says it is a call, so a call without arguments is a call without
        // arguments.
        if let Some(Value::Array(items)) = object.get_mut("tool_calls") {
            let calls = std::mem::take(items)
                .into_iter()
                .map(|v| call_from_value(v, false))
                .collect::<Option<Vec<_>>>()?;
            return (!calls.is_empty()).then_some(calls);
        }
        if let Some(call) = object.remove("tool_call") {
            return call_from_value(call, false).map(|c| vec![c]);
        }
    }
    call_from_value(Value::Object(object), true).map(|c| vec![c])
}

/// A call object: `{"name": "f", "arguments": {…}}` (`"parameters"` also accepted; arguments
/// as a string holding a JSON object are decoded), with an optional string `"id"`; an
/// OpenAI-shaped `{"id", "type": "function", "function": {"name", "arguments"}}` too.
/// Missing arguments mean `{}` unless `require_args`.
fn call_from_value(value: Value, require_args: bool) -> Option<ToolCall> {
    let Value::Object(mut object) = value else {
        return None;
    };
    let mut id = object.get("id").and_then(Value::as_str).map(str::to_owned);
    if !object.contains_key("name") {
        if let Some(Value::Object(inner)) = object.remove("function") {
            id = id.or_else(|| inner.get("id").and_then(Value::as_str).map(str::to_owned));
            object = inner;
        }
    }
    let name = match object.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        _ => return None,
    };
    let args = match object
        .remove("arguments")
        .or_else(|| object.remove("parameters"))
    {
        Some(Value::Object(args)) => args,
        Some(Value::String(text)) => match serde_json::from_str(&text) {
            Ok(Value::Object(args)) => args,
            _ => return None,
        },
        None if !require_args => Map::new(),
        _ => return None,
    };
    Some(ToolCall {
        id,
        name,
        arguments: Value::Object(args).to_string(),
    })
}

fn skip_ws(s: &str, at: usize) -> usize {
    take_while(s, at, char::is_whitespace)
}

/// The offset after the chars from `at` that satisfy `keep`.
fn take_while(s: &str, at: usize, keep: impl Fn(char) -> bool) -> usize {
    s[at..].find(|c: char| !keep(c)).map_or(s.len(), |i| at + i)
}

enum Lit {
    /// The text at the offset starts with the word.
    Full,
    /// The text at the offset is a proper prefix of the word (possibly empty): more may
    /// complete it.
    Partial,
    No,
}

fn lit(s: &str, at: usize, word: &str) -> Lit {
    lit_by(s, at, word, |a, b| a == b)
}

fn lit_ascii_ci(s: &str, at: usize, word: &str) -> Lit {
    lit_by(s, at, word, |a, b| a.eq_ignore_ascii_case(&b))
}

fn lit_by(s: &str, at: usize, word: &str, eq: impl Fn(u8, u8) -> bool) -> Lit {
    let rest = &s.as_bytes()[at..];
    let word = word.as_bytes();
    let n = rest.len().min(word.len());
    if !rest[..n].iter().zip(&word[..n]).all(|(&a, &b)| eq(a, b)) {
        Lit::No
    } else if n == word.len() {
        Lit::Full
    } else {
        Lit::Partial
    }
}

enum Scan {
    /// The value ends after this many bytes.
    Done(usize),
    /// Valid so far, not finished.
    More,
    /// Not JSON.
    Invalid,
}

/// Incremental check of one JSON object or array: finds where it ends and rejects text that
/// cannot be JSON as soon as it appears (so plain text after `{` or a marker is released at
/// once rather than held to the end). Numbers and escapes are checked loosely; serde_json
/// checks the finished value. Never rejects what serde_json accepts.
#[derive(Debug, Clone, Default)]
struct JsonScan {
    /// Bytes consumed.
    pos: usize,
    /// Open `{` / `[`.
    stack: Vec<u8>,
    state: ScanState,
    /// Set once decided.
    result: Option<Result<usize, ()>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ScanState {
    /// A value must come.
    #[default]
    Value,
    /// After `[`: a value or `]`.
    FirstItem,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object.
    Key,
    Colon,
    /// After a value: `,` or the closing bracket.
    AfterValue,
    Str {
        key: bool,
        escaped: bool,
    },
    Literal {
        word: &'static [u8],
        matched: usize,
    },
    Number,
}

impl JsonScan {
    /// Scans `text` (all the text from the value's start) from where the last call stopped.
    fn advance(&mut self, text: &[u8]) -> Scan {
        if self.result.is_none() {
            self.result = self.run(text);
        }
        match self.result {
            None => Scan::More,
            Some(Ok(len)) => Scan::Done(len),
            Some(Err(())) => Scan::Invalid,
        }
    }

    fn run(&mut self, text: &[u8]) -> Option<Result<usize, ()>> {
        use ScanState as S;
        while let Some(&b) = text.get(self.pos) {
            let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
            let next = match self.state {
                S::Str { key, escaped } => match b {
                    _ if escaped => S::Str {
                        key,
                        escaped: false,
                    },
                    b'\\' => S::Str { key, escaped: true },
                    b'"' if key => S::Colon,
                    b'"' => S::AfterValue,
                    0..=0x1f => return Some(Err(())),
                    _ => self.state,
                },
                S::Literal { word, matched } => {
                    if word.get(matched) != Some(&b) {
                        return Some(Err(()));
                    }
                    if matched + 1 == word.len() {
                        S::AfterValue
                    } else {
                        S::Literal {
                            word,
                            matched: matched + 1,
                        }
                    }
                }
                S::Number => {
                    if matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                        S::Number
                    } else {
                        // The number ended; this byte is read again after it.
                        self.state = S::AfterValue;
                        continue;
                    }
                }
                _ if ws => self.state,
                S::Value | S::FirstItem => match b {
                    b'{' => {
                        self.stack.push(b'}');
                        S::FirstKey
                    }
                    b'[' => {
                        self.stack.push(b']');
                        S::FirstItem
                    }
                    b'"' => S::Str {
                        key: false,
                        escaped: false,
                    },
                    b't' => S::Literal {
                        word: b"true",
                        matched: 1,
                    },
                    b'f' => S::Literal {
                        word: b"false",
                        matched: 1,
                    },
                    b'n' => S::Literal {
                        word: b"null",
                        matched: 1,
                    },
                    b'-' | b'0'..=b'9' => S::Number,
                    b']' if self.state == S::FirstItem => match self.close(b) {
                        Some(done) => return Some(done),
                        None => S::AfterValue,
                    },
                    _ => return Some(Err(())),
                },
                S::FirstKey | S::Key => match b {
                    b'"' => S::Str {
                        key: true,
                        escaped: false,
                    },
                    b'}' if self.state == S::FirstKey => match self.close(b) {
                        Some(done) => return Some(done),
                        None => S::AfterValue,
                    },
                    _ => return Some(Err(())),
                },
                S::Colon if b == b':' => S::Value,
                S::Colon => return Some(Err(())),
                S::AfterValue => match b {
                    b',' if self.stack.last() == Some(&b'}') => S::Key,
                    b',' => S::Value,
                    b'}' | b']' => match self.close(b) {
                        Some(done) => return Some(done),
                        None => S::AfterValue,
                    },
                    _ => return Some(Err(())),
                },
            };
            self.state = next;
            self.pos += 1;
        }
        None
    }

    /// Closes the innermost bracket with `b` (at `self.pos`); Some once the whole value is
    /// closed (or the bracket does not match).
    fn close(&mut self, b: u8) -> Option<Result<usize, ()>> {
        if self.stack.pop() != Some(b) {
            return Some(Err(()));
        }
        self.stack.is_empty().then_some(Ok(self.pos + 1))
    }
}

/// The offset of the `)` closing a Python argument list that starts at `at`, if it is in `s`
/// (quotes and brackets inside are skipped).
fn python_call_end(s: &str, at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in s[at..].char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => depth += 1,
            ')' if depth == 0 => return Some(at + i),
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Python keyword arguments `key="v", n=1, flag=True` as a JSON object. Values: string,
/// number, True/False/None, and lists/dicts of those. None for anything else (positional
/// arguments, expressions, repeated keys).
fn parse_python_kwargs(s: &str) -> Option<Map<String, Value>> {
    let mut p = Py {
        s,
        pos: 0,
        depth: 0,
    };
    let mut args = Map::new();
    loop {
        p.ws();
        if p.peek().is_none() {
            return Some(args);
        }
        let key = p.ident()?;
        p.ws();
        p.eat('=')?;
        let value = p.value()?;
        if args.insert(key.to_owned(), value).is_some() {
            return None;
        }
        p.ws();
        match p.peek() {
            None => return Some(args),
            Some(',') => p.pos += 1,
            Some(_) => return None,
        }
    }
}

/// A cursor over Python literal text.
struct Py<'a> {
    s: &'a str,
    pos: usize,
    /// Lists/dicts open: bounded so model text cannot overflow the stack.
    depth: usize,
}

const PY_MAX_DEPTH: usize = 64;

impl<'a> Py<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, c: char) -> Option<()> {
        (self.bump()? == c).then_some(())
    }

    fn ws(&mut self) {
        self.pos = skip_ws(self.s, self.pos);
    }

    fn ident(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if !self.peek()?.is_alphabetic() && self.peek()? != '_' {
            return None;
        }
        self.pos = take_while(self.s, start, |c| c.is_alphanumeric() || c == '_');
        Some(&self.s[start..self.pos])
    }

    fn value(&mut self) -> Option<Value> {
        self.ws();
        let value = match self.peek()? {
            q @ ('"' | '\'') => Value::String(self.string(q)?),
            '[' | '{' if self.depth == PY_MAX_DEPTH => return None,
            '[' => {
                self.pos += 1;
                self.depth += 1;
                Value::Array(self.items(']', |p| p.value())?)
            }
            '{' => {
                self.pos += 1;
                self.depth += 1;
                let pairs = self.items('}', |p| {
                    p.ws();
                    let q = p.peek()?;
                    if q != '"' && q != '\'' {
                        return None;
                    }
                    let key = p.string(q)?;
                    p.ws();
                    p.eat(':')?;
                    Some((key, p.value()?))
                })?;
                Value::Object(pairs.into_iter().collect())
            }
            '-' | '+' | '.' | '0'..='9' => self.number()?,
            _ => match self.ident()? {
                "True" => Value::Bool(true),
                "False" => Value::Bool(false),
                "None" => Value::Null,
                _ => return None,
            },
        };
        self.ws();
        Some(value)
    }

    /// Comma-separated items up to `close` (a trailing comma allowed, as in Python).
    fn items<T>(&mut self, close: char, item: impl Fn(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let mut items = Vec::new();
        loop {
            self.ws();
            if self.peek()? == close {
                self.pos += 1;
                self.depth -= 1;
                return Some(items);
            }
            items.push(item(self)?);
            self.ws();
            match self.bump()? {
                ',' => {}
                c if c == close => {
                    self.depth -= 1;
                    return Some(items);
                }
                _ => return None,
            }
        }
    }

    fn number(&mut self) -> Option<Value> {
        let start = self.pos;
        self.pos = take_while(self.s, start, |c| {
            c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-' | '_')
        });
        let text: String = self.s[start..self.pos]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        if let Ok(n) = text.parse::<i64>() {
            return Some(Value::from(n));
        }
        let x = text.parse::<f64>().ok().filter(|x| x.is_finite())?;
        serde_json::Number::from_f64(x).map(Value::Number)
    }

    /// A quoted string (no prefixes, no triple quotes), with Python's escapes.
    fn string(&mut self, quote: char) -> Option<String> {
        self.eat(quote)?;
        let mut out = String::new();
        loop {
            match self.bump()? {
                c if c == quote => return Some(out),
                '\n' => return None,
                '\\' => match self.bump()? {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'v' => out.push('\u{b}'),
                    'a' => out.push('\u{7}'),
                    '0' => out.push('\0'),
                    '\n' => {}
                    'x' => out.push(self.hex(2)?),
                    'u' => out.push(self.hex(4)?),
                    'U' => out.push(self.hex(8)?),
                    c @ ('\\' | '\'' | '"') => out.push(c),
                    // Python keeps unknown escapes as written.
                    c => {
                        out.push('\\');
                        out.push(c);
                    }
                },
                c => out.push(c),
            }
        }
    }

    fn hex(&mut self, digits: usize) -> Option<char> {
        let end = self.pos.checked_add(digits)?;
        let text = self.s.get(self.pos..end)?;
        if !text.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        self.pos = end;
        char::from_u32(u32::from_str_radix(text, 16).ok()?)
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;

/// For templates that do not show the model its `tools`: a system message describing them and
/// the generic JSON call syntax ([`ToolCallFormat::Generic`]), merged into the conversation's
/// first system message.
pub fn describe_tools_in_system(messages: &[Value], tools: &[Value]) -> Vec<Value> {
    let listed: Vec<Value> = tools
        .iter()
        .map(|t| t.get("function").cloned().unwrap_or_else(|| t.clone()))
        .collect();
    let text = format!(
        "You can call these tools:\n{}\n\nTo call tools, answer with only this JSON: \
         {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}]}}. \
         Otherwise answer in plain text.",
        serde_json::to_string_pretty(&listed).unwrap_or_default()
    );
    let mut out = messages.to_vec();
    match out.first_mut() {
        Some(m) if m.get("role").and_then(Value::as_str) == Some("system") => {
            let prior = m.get("content").and_then(Value::as_str).unwrap_or("");
            m["content"] = Value::from(format!("{prior}\n\n{text}").trim_start());
        }
        _ => out.insert(0, serde_json::json!({"role": "system", "content": text})),
    }
    out
}
