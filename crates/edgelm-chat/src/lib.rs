//! Chat templates: turn a conversation into the prompt text a model was trained on, by rendering
//! the Jinja template stored in its GGUF file (`tokenizer.chat_template`).
//!
//! The output is meant to be byte-identical to Hugging Face transformers'
//! `apply_chat_template(..., tokenize=False)`, which renders with Python's jinja2. The template
//! environment is configured like transformers' `_compile_jinja_template`:
//! - `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off (jinja2's default);
//! - `{% break %}` / `{% continue %}` (jinja2's `loopcontrols` extension);
//! - `tojson` is Python's `json.dumps(x, ensure_ascii=False, indent=.., separators=..,
//!   sort_keys=..)`, not Jinja's HTML-safe one;
//! - globals `raise_exception(msg)` and `strftime_now(fmt)`;
//! - context `messages`, `tools` (none when not given), `documents` (none),
//!   `add_generation_prompt`, `bos_token`, `eos_token`;
//! - Python's string/list/dict methods (`.strip()`, `.split()`, `.items()`, …);
//! - the `{% generation %}` tag of transformers' assistant-mask extension renders its body.
//!
//! Models without a template get [`CHATML_TEMPLATE`].
//!
//! Where minijinja alone would differ from jinja2, this crate adjusts it: floats print as Python's
//! `repr` (`1e+16`), `escape` uses MarkupSafe's entities, `is sequence` holds for strings and
//! dicts, `map('filter', key=value)` passes the keywords on, and the newline after `{% raw %}` is
//! kept. Known remaining differences, none used by common chat templates: floats joined with `~`
//! or `join` or printed inside lists and dicts use minijinja's text (differs only beyond 1e16 or
//! below 1e-4); `%` string formatting and unary `+` are not supported; a few rarely used filters,
//! tests, globals and methods are missing (`center`, `truncate`, `wordwrap`, `wordcount`,
//! `random`, `dictsort(by=)`, `callable`, `lipsum`, `cycler`, `joiner`, `str.zfill`,
//! `str.index`, `str.ljust`, `str.removeprefix`, `list.index`, …): those fail with an error
//! rather than render differently; `int`/`float` fail on text they cannot parse where jinja2
//! returns 0; the `attr` filter also finds dict items; comparisons Python rejects
//! (`none < 1`, sorting mixed types) render instead of failing.

#![forbid(unsafe_code)]

mod clock;
mod pyjson;
pub mod tools;

pub use tools::{
    describe_tools_in_system, parse_tool_calls, ParsedOutput, ToolCall, ToolCallFormat,
    ToolCallParser, ToolEvent,
};

use minijinja::value::{Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Environment, ErrorKind};
use std::borrow::Cow;

/// The template used when the model has none: ChatML, as SmolLM 2, Qwen 2.5 and most models
/// without their own format expect. `<|im_start|>{role}\n{content}<|im_end|>\n` per message
/// (a null content renders as empty), then `<|im_start|>assistant\n` for the generation prompt.
pub const CHATML_TEMPLATE: &str = "\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

const TEMPLATE_NAME: &str = "chat_template";

/// The work one render may do, in minijinja fuel (about one per instruction executed plus one
/// per 64 bytes of data produced or visited). The template comes from a downloaded model file,
/// so a loop like `{% for i in range(100000) %}{% for j in range(100000) %}` must fail rather
/// than hang the server, and a string doubled in a loop must fail before it fills memory (the
/// budget pays for at most 320 MB of produced data).
pub const RENDER_FUEL: u64 = 5_000_000;

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template text is not valid Jinja (or uses syntax this engine lacks).
    #[error(
        "the chat template does not compile: {reason}; fix the template, or render with the \
         built-in ChatML template by passing no template"
    )]
    Compile { reason: String },
    /// Rendering failed: the template used a value the conversation does not provide (or
    /// provides with another type), or a filter/method failed.
    #[error(
        "rendering the chat template failed: {reason}; check that the messages have the fields \
         and types this template reads (role, content as a string, tool_calls, …)"
    )]
    Render { reason: String },
    /// The template rejected the conversation with `raise_exception(message)`; the text is the
    /// template's own, as transformers reports it.
    #[error("{message}")]
    Raised { message: String },
    /// A message is not an object, or its content is neither a string, null, nor a list of
    /// text parts.
    #[error("message {index} {problem}")]
    InvalidMessage { index: usize, problem: String },
}

/// A model's chat template, compiled once and rendered per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    fallback: bool,
    /// Whether the template reads `tools` at all.
    renders_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, the GGUF `tokenizer.chat_template` (None → the built-in
    /// [`CHATML_TEMPLATE`]). `bos_token` / `eos_token` are the texts templates see as
    /// `bos_token` / `eos_token` (empty when the model has none).
    pub fn new(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ChatError> {
        let fallback = source.is_none();
        let source = rewrite_tags(source.unwrap_or(CHATML_TEMPLATE)).into_owned();
        let renders_tools = source.contains("tools");
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatError::Compile {
                reason: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            fallback,
            renders_tools,
        })
    }

    /// Whether this is the built-in ChatML template (the model has none of its own).
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// The prompt of the assistant's next turn: [`ChatTemplate::render`] with the generation
    /// prompt, where a template that does not read `tools` gets them described in the system
    /// message instead (`tools::describe_tools_in_system`), so every model can be offered tools.
    pub fn render_prompt(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, ChatError> {
        match tools {
            Some(list) if !self.renders_tools => {
                let described = tools::describe_tools_in_system(messages, list);
                self.render(&described, None, true)
            }
            _ => self.render(messages, tools, true),
        }
    }

    /// Renders the conversation.
    ///
    /// `messages` are OpenAI-shaped message objects (`role`, `content` as a string or null, and
    /// optionally `tool_calls`, `tool_call_id`, `name`), passed to the template as they are,
    /// except that a `content` given as a list of OpenAI content parts
    /// (`[{"type": "text", "text": "…"}]`) is joined into one string first: the templates of
    /// text-only models concatenate `content` as a string. Parts other than text are an error.
    ///
    /// `tools` is the OpenAI `tools` list; without it the template sees `tools` as none, as under
    /// transformers. Object keys keep the order they were given in (templates print tool
    /// schemas with `tojson`).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(i, m))
            .collect::<Result<Vec<Value>, ChatError>>()?;
        let tools = match tools {
            Some(list) => Value::from(list.iter().map(to_value).collect::<Vec<_>>()),
            None => Value::from(()),
        };
        let ctx = Value::from_pairs([
            ("messages", Value::from(messages)),
            ("tools", tools),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render {
                reason: describe(&e),
            })?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => ChatError::Raised { message },
            None => ChatError::Render {
                reason: describe(&e),
            },
        })
    }
}

/// Builders of OpenAI-shaped message objects for [`ChatTemplate::render`].
pub struct Message;

impl Message {
    /// `{"role": role, "content": content}`.
    pub fn with_role(role: &str, content: &str) -> serde_json::Value {
        serde_json::json!({ "role": role, "content": content })
    }

    pub fn system(content: &str) -> serde_json::Value {
        Message::with_role("system", content)
    }

    pub fn user(content: &str) -> serde_json::Value {
        Message::with_role("user", content)
    }

    pub fn assistant(content: &str) -> serde_json::Value {
        Message::with_role("assistant", content)
    }

    /// A tool's result, answering the assistant's tool call `tool_call_id`.
    pub fn tool(tool_call_id: &str, content: &str) -> serde_json::Value {
        serde_json::json!({ "role": "tool", "tool_call_id": tool_call_id, "content": content })
    }
}

/// The environment of transformers' `_compile_jinja_template`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(RENDER_FUEL));
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", pyjson::tojson_filter);
    // MarkupSafe's entities (`&#39;`, `&#34;`), not minijinja's (`&#x27;`, `&quot;`).
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("string", |v: &Value| -> Value {
        if v.is_safe() || v.as_str().is_some() {
            v.clone()
        } else {
            Value::from(display(v))
        }
    });
    env.add_filter("map", map_filter);
    // jinja2's `sequence` test is "has a length and items": strings and dicts pass too.
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String | ValueKind::Bytes | ValueKind::Seq | ValueKind::Map
        )
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |fmt: &str| {
        clock::DateTime::now().format(fmt)
    });
    // jinja2 prints floats with Python's repr (`1e+16`, `1e-05`); minijinja's printing of other
    // values already matches Python's `str`.
    env.set_formatter(|out, state, value| {
        if is_float(value) {
            out.write_str(&display(value))
                .map_err(minijinja::Error::from)
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env
}

fn is_float(v: &Value) -> bool {
    v.kind() == ValueKind::Number && !v.is_integer()
}

/// Python's `str(v)` for the values where minijinja's text differs (floats).
fn display(v: &Value) -> String {
    if is_float(v) {
        pyjson::float_repr(f64::try_from(v.clone()).unwrap_or(f64::NAN))
    } else {
        v.to_string()
    }
}

/// `map('filter', args…, key=value)`: minijinja's `map` drops keyword arguments meant for the
/// mapped filter (`map('tojson', indent=2)`), jinja2 passes them on.
fn map_filter(
    state: &mut minijinja::State,
    value: Value,
    args: Rest<ValueOrKwargs>,
) -> Result<Vec<Value>, minijinja::Error> {
    let args = args.into_values();
    let filter_with_kwargs = args
        .first()
        .and_then(|a| a.as_str())
        .map(str::to_owned)
        .filter(|_| args.last().is_some_and(|a| a.is_kwargs()));
    let Some(filter) = filter_with_kwargs else {
        let mut call = vec![value];
        call.extend(args);
        return Ok(Value::from_function(minijinja::filters::map)
            .call(state, &call)?
            .try_iter()?
            .collect());
    };
    if value.is_undefined() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in value.try_iter()? {
        let mut call = vec![item];
        call.extend(args[1..].iter().cloned());
        out.push(state.apply_filter(&filter, &call)?);
    }
    Ok(out)
}

fn escape(v: &Value) -> Value {
    if v.is_safe() {
        return v.clone();
    }
    let text = display(v);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    Value::from_safe_string(out)
}

/// Marks an error as the template's own `raise_exception` so [`ChatTemplate::render`] can report
/// just its message.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: Value) -> Result<Value, minijinja::Error> {
    // transformers raises `TemplateError(message)`; a non-string is printed as Python would.
    let message = message.to_string();
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        source = err.source();
    }
    None
}

/// minijinja's message with its location and any chained causes.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// Source rewrites for two tags minijinja treats differently from jinja2:
/// - `{% generation %}…{% endgeneration %}` (transformers' `AssistantTracker`, which renders the
///   body) becomes `{% if true %}…{% endif %}`: same text, same whitespace control;
/// - `{% raw %}`: jinja2's `trim_blocks` does not remove the newline after it, minijinja's does,
///   so it becomes `{% raw +%}` (keep the newline). Raw bodies are copied untouched.
///
/// Tags are looked for outside `{{ … }}` and `{# … #}` (scanned naively: a `}}` inside a string
/// literal ends the skip early, which only matters if such a string also spells one of these tags).
fn rewrite_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") && !source.contains("raw") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len() + 8);
    let mut rest = source;
    while let Some(start) = rest.find('{') {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let skip_to = if from.starts_with("{{") {
            Some("}}")
        } else if from.starts_with("{#") {
            Some("#}")
        } else {
            None
        };
        if let Some(end) = skip_to {
            let len = from[2..].find(end).map_or(from.len(), |i| i + 4);
            out.push_str(&from[..len]);
            rest = &from[len..];
            continue;
        }
        let Some(tag) = parse_tag(from) else {
            out.push('{');
            rest = &from[1..];
            continue;
        };
        let (head, tail) = (&from[..tag.word_start], &from[tag.word_end..tag.len]);
        match tag.word {
            "generation" => out.extend([head, "if true", tail]),
            "endgeneration" => out.extend([head, "endif", tail]),
            "raw" => {
                out.push_str(&from[..tag.len - 2]);
                out.push_str(if tag.end_modifier { "%}" } else { "+%}" });
                // Copy the body verbatim up to its `{% endraw %}`.
                let body = &from[tag.len..];
                let mut at = 0;
                let body_len = loop {
                    match body[at..].find("{%") {
                        Some(i)
                            if parse_tag(&body[at + i..]).is_some_and(|t| t.word == "endraw") =>
                        {
                            break at + i
                        }
                        Some(i) => at += i + 2,
                        None => break body.len(),
                    }
                };
                out.push_str(&body[..body_len]);
                rest = &body[body_len..];
                continue;
            }
            _ => out.push_str(&from[..tag.len]),
        }
        rest = &from[tag.len..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// A block tag whose whole content is one word: `{%[-+] word [-+]%}`.
struct Tag<'a> {
    word: &'a str,
    word_start: usize,
    word_end: usize,
    /// Whether `-` or `+` precedes the closing `%}`.
    end_modifier: bool,
    len: usize,
}

fn parse_tag(s: &str) -> Option<Tag<'_>> {
    let inner = s.strip_prefix("{%")?;
    let mut at = 2 + usize::from(inner.starts_with(['-', '+']));
    at += s[at..].len() - s[at..].trim_start().len();
    let word_len = s[at..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len() - at);
    let (word_start, word_end) = (at, at + word_len);
    let after = s[word_end..].trim_start();
    let end_modifier = after.starts_with(['-', '+']);
    let close = if end_modifier { &after[1..] } else { after };
    if word_len == 0 || !close.starts_with("%}") {
        return None;
    }
    Some(Tag {
        word: &s[word_start..word_end],
        word_start,
        word_end,
        end_modifier,
        len: s.len() - close.len() + 2,
    })
}

/// A message as the template sees it: the JSON object as it is, with a content-part list joined
/// into one string.
fn message_value(index: usize, message: &serde_json::Value) -> Result<Value, ChatError> {
    let invalid = |problem: String| ChatError::InvalidMessage { index, problem };
    let Some(obj) = message.as_object() else {
        return Err(invalid(
            "is not a JSON object; send {\"role\": …, \"content\": …}".to_owned(),
        ));
    };
    let Some(serde_json::Value::Array(parts)) = obj.get("content") else {
        return Ok(to_value(message));
    };
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(|t| t.as_str()).unwrap_or("");
        match (kind, part.get("text").and_then(|t| t.as_str())) {
            ("text", Some(t)) => text.push_str(t),
            ("text", None) => {
                return Err(invalid(format!(
                    "has a text content part ({i}) without a \"text\" string"
                )))
            }
            (other, _) => {
                return Err(invalid(format!(
                    "has a content part of type {other:?} ({i}); this model takes text only, \
                     send {{\"type\": \"text\", \"text\": …}} parts or a string"
                )))
            }
        }
    }
    Ok(Value::from_pairs(obj.iter().map(|(k, v)| {
        let v = if k == "content" {
            Value::from(text.as_str())
        } else {
            to_value(v)
        };
        (Value::from(k.as_str()), v)
    })))
}

/// JSON to template value, keeping object key order.
fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(to_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => Value::from_pairs(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), to_value(v))),
        ),
    }
}

#[cfg(test)]
mod tests;
