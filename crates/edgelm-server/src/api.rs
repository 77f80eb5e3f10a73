//! Request bodies of `/v1/chat/completions` and `/v1/completions`: every field read with its
//! type and range checked, so a client's mistake is a 400 naming the field. Fields this server
//! does not use (`user`, `metadata`, …) are ignored, as OpenAI's API does with unknown ones;
//! fields whose meaning it cannot honour are refused rather than silently dropped.

use crate::error::{type_name, ApiError};
use edgelm_engine::SamplingParams;
use serde_json::{Map, Value};

/// Most alternatives reported per token position.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What the prompt is, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages (rendered through the model's template) and the `tools` list.
    Chat {
        messages: Vec<Value>,
        tools: Option<Vec<Value>>,
    },
    Text(String),
    Tokens(Vec<u32>),
}

/// What the output must be (`response_format`).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// A value valid under this schema (`strict` or not: edgelm always enforces it).
    JsonSchema(Value),
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are not offered (nor rendered into the prompt).
    None,
    Auto,
    Required,
    Function(String),
}

/// Which endpoint a request came to; it decides response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    /// The request field that carries the prompt, for error messages.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Params {
    pub kind: Kind,
    pub model: Option<String>,
    pub prompt: Prompt,
    /// None: chat runs to the end of the context, completions take OpenAI's default of 16.
    pub max_tokens: Option<usize>,
    /// Sampling with the engine's defaults where the request is silent; `seed` is separate.
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per generated token when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    /// Completions: return the prompt before the completion (with its log-probabilities when
    /// `logprobs` is set).
    pub echo: bool,
    pub logit_bias: Vec<(u32, f32)>,
    pub ignore_eos: bool,
    pub format: OutputFormat,
    /// `Auto` unless the request said otherwise; meaningless without tools.
    pub tool_choice: ToolChoice,
}

/// Typed access to a request object's fields; `null` counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn number(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::field(
                key,
                format!(
                    "`{key}` must be a number from {lo} to {hi}; got {}",
                    shown(v)
                ),
            )),
        }
    }

    fn integer(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::field(
                key,
                format!(
                    "`{key}` must be an integer from {lo} to {hi}; got {}",
                    shown(v)
                ),
            )),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool().map(Some).ok_or_else(|| {
            ApiError::field(
                key,
                format!("`{key}` must be true or false; got {}", shown(v)),
            )
        })
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str().map(Some).ok_or_else(|| {
            ApiError::field(
                key,
                format!("`{key}` must be a string; got {}", type_name(v)),
            )
        })
    }

    fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_array().map(Some).ok_or_else(|| {
            ApiError::field(
                key,
                format!("`{key}` must be an array; got {}", type_name(v)),
            )
        })
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_object().map(Some).ok_or_else(|| {
            ApiError::field(
                key,
                format!("`{key}` must be an object; got {}", type_name(v)),
            )
        })
    }
}

/// Parse the bytes of a request body to `kind`'s endpoint: a JSON object (else a 400 saying
/// where it is malformed), then [`parse_chat`] or [`parse_completion`]. The server's handlers do
/// the same in two steps (the body extractor, then the endpoint's parser).
pub fn parse_body(kind: Kind, bytes: &[u8]) -> Result<Params, ApiError> {
    let body = crate::error::parse_object(bytes)?;
    match kind {
        Kind::Chat => parse_chat(&body),
        Kind::Completion => parse_completion(&body),
    }
}

/// Parse a `/v1/chat/completions` body.
pub fn parse_chat(body: &Map<String, Value>) -> Result<Params, ApiError> {
    let f = Fields(body);
    let messages = f
        .array("messages")?
        .ok_or_else(|| ApiError::field("messages", "`messages` is required: a list of messages"))?;
    if messages.is_empty() {
        return Err(ApiError::field(
            "messages",
            "`messages` is empty; give at least one message",
        ));
    }
    if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !m.is_object()) {
        return Err(ApiError::field(
            "messages",
            format!(
                "message {i} must be an object with `role` and `content`; got {}",
                type_name(m)
            ),
        ));
    }
    let tools = match f.array("tools")? {
        Some(list) => Some(parse_tools(list)?),
        None => None,
    };
    let tool_choice = parse_tool_choice(&f, tools.as_deref())?;
    // Tools a request declines are not shown to the model either.
    let tools = tools.filter(|t| !t.is_empty() && tool_choice != ToolChoice::None);
    let logprobs = f.boolean("logprobs")?.unwrap_or(false);
    let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::field(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true",
        ));
    }
    // `max_completion_tokens` is the current name, `max_tokens` the deprecated one.
    let max_tokens = match f.integer("max_completion_tokens", 1, i64::MAX)? {
        Some(m) => Some(m),
        None => f.integer("max_tokens", 1, i64::MAX)?,
    };
    let mut p = common(&f, Kind::Chat)?;
    if tools.is_some() && p.format != OutputFormat::Text && tool_choice != ToolChoice::Auto {
        return Err(ApiError::field(
            "response_format",
            "a forced tool call (`tool_choice` required or a function) and `response_format` \
             cannot both shape the output; drop one",
        ));
    }
    p.tool_choice = tool_choice;
    p.prompt = Prompt::Chat {
        messages: messages
            .iter()
            .map(tool_call_arguments_as_objects)
            .collect(),
        tools,
    };
    p.max_tokens = max_tokens.map(|m| m as usize);
    p.logprobs = logprobs.then_some(top.unwrap_or(0) as usize);
    Ok(p)
}

/// Parse a `/v1/completions` body.
pub fn parse_completion(body: &Map<String, Value>) -> Result<Params, ApiError> {
    let f = Fields(body);
    let prompt = match f.get("prompt") {
        None => return Err(ApiError::field("prompt", "`prompt` is required")),
        Some(v) => completion_prompt(v)?,
    };
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported by this server; leave it out",
        ));
    }
    if let Some(b) = f.integer("best_of", 1, i64::MAX)? {
        if b > 1 {
            return Err(ApiError::field(
                "best_of",
                "`best_of` above 1 is not supported by this server; use `n` for several choices",
            ));
        }
    }
    let mut p = common(&f, Kind::Completion)?;
    p.prompt = prompt;
    p.max_tokens = f.integer("max_tokens", 1, i64::MAX)?.map(|m| m as usize);
    p.logprobs = f
        .integer("logprobs", 0, MAX_TOP_LOGPROBS as i64)?
        .map(|n| n as usize);
    p.echo = f.boolean("echo")?.unwrap_or(false);
    Ok(p)
}

/// Token ids a request gives in field `param` (`what` names the list in the message):
/// non-negative integers that fit in 32 bits (the vocabulary is checked when the engine
/// accepts the request).
pub(crate) fn token_ids(list: &[Value], param: &str, what: &str) -> Result<Vec<u32>, ApiError> {
    list.iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    ApiError::field(
                        param,
                        format!(
                            "{what} must hold non-negative integer token ids; got {}",
                            shown(t)
                        ),
                    )
                })
        })
        .collect()
}

/// A completions prompt: a string or a list of token ids, alone or as a one-element list.
fn completion_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let several = || {
        ApiError::field(
            "prompt",
            "this server takes one prompt per request; send the prompts as separate requests",
        )
    };
    let tokens =
        |list: &[Value]| token_ids(list, "prompt", "a token-id prompt").map(Prompt::Tokens);
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(list) => match list.first() {
            None => Err(ApiError::field("prompt", "`prompt` is an empty list")),
            Some(Value::Number(_)) => tokens(list),
            Some(Value::String(s)) if list.len() == 1 => Ok(Prompt::Text(s.clone())),
            Some(Value::Array(inner)) if list.len() == 1 => tokens(inner),
            Some(Value::String(_) | Value::Array(_)) => Err(several()),
            Some(other) => Err(ApiError::field(
                "prompt",
                format!(
                    "`prompt` must be a string, a list of token ids, or a list of one of \
                     those; got a list of {}",
                    type_name(other)
                ),
            )),
        },
        other => Err(ApiError::field(
            "prompt",
            format!(
                "`prompt` must be a string or a list of token ids; got {}",
                type_name(other)
            ),
        )),
    }
}

/// The fields both endpoints share.
fn common(f: &Fields, kind: Kind) -> Result<Params, ApiError> {
    let model = f.string("model")?.map(str::to_owned);
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: f
            .number("temperature", 0.0, 2.0)?
            .map_or(defaults.temperature, |x| x as f32),
        top_p: f
            .number("top_p", 0.0, 1.0)?
            .map_or(defaults.top_p, |x| x as f32),
        top_k: f
            .integer("top_k", 0, u32::MAX as i64)?
            .map_or(defaults.top_k, |x| x as usize),
        min_p: f
            .number("min_p", 0.0, 1.0)?
            .map_or(defaults.min_p, |x| x as f32),
        repeat_penalty: f
            .number("repeat_penalty", 0.0, 10.0)?
            .map_or(defaults.repeat_penalty, |x| x as f32),
        frequency_penalty: f
            .number("frequency_penalty", -2.0, 2.0)?
            .map_or(defaults.frequency_penalty, |x| x as f32),
        presence_penalty: f
            .number("presence_penalty", -2.0, 2.0)?
            .map_or(defaults.presence_penalty, |x| x as f32),
        ..defaults
    };
    // Seeds are any 64-bit integer; negative ones are taken as their two's-complement bits.
    let seed = match f.get("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| {
                    ApiError::field(
                        "seed",
                        format!("`seed` must be an integer; got {}", shown(v)),
                    )
                })?,
        ),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| {
                ApiError::field("stop", "`stop` must be a string or a list of strings")
            })?,
        Some(other) => {
            return Err(ApiError::field(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings; got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if stop.len() > 16 {
        return Err(ApiError::field("stop", "`stop` holds at most 16 strings"));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::field(
            "stop",
            "a stop string is empty; every stop string needs at least one character",
        ));
    }
    let logit_bias = match f.object("logit_bias")? {
        None => Vec::new(),
        Some(map) => map
            .iter()
            .map(|(k, v)| {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::field(
                        "logit_bias",
                        format!("`logit_bias` keys are token ids as strings (\"1234\"); got {k:?}"),
                    )
                })?;
                match v.as_f64() {
                    Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                    _ => Err(ApiError::field(
                        "logit_bias",
                        format!(
                            "`logit_bias` values are numbers from -100 to 100; got {} for token {id}",
                            shown(v)
                        ),
                    )),
                }
            })
            .collect::<Result<Vec<_>, ApiError>>()?,
    };
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        None => false,
        Some(o) => Fields(o)
            .boolean("include_usage")
            .map_err(|e| e.param("stream_options"))?
            .unwrap_or(false),
    };
    Ok(Params {
        kind,
        model,
        prompt: Prompt::Text(String::new()),
        max_tokens: None,
        sampling,
        seed,
        stop,
        n: f.integer("n", 1, i64::MAX)?.map_or(1, |n| n as usize),
        stream,
        include_usage,
        logprobs: None,
        echo: false,
        logit_bias,
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        format: parse_response_format(f)?,
        tool_choice: ToolChoice::Auto,
    })
}

/// `response_format`: `{"type": "text" | "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn parse_response_format(f: &Fields) -> Result<OutputFormat, ApiError> {
    const P: &str = "response_format";
    let Some(rf) = f.object(P)? else {
        return Ok(OutputFormat::Text);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(OutputFormat::Text),
        Some("json_object") => Ok(OutputFormat::JsonObject),
        Some("json_schema") => {
            let js = rf
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::field(
                    P,
                    "`response_format.json_schema` is required for type json_schema: an object \
                     with `name` and `schema`",
                )
                })?;
            match js.get("schema") {
                // A schema-less json_schema asks for any JSON value shape: an object, as
                // OpenAI's structured outputs always return.
                None | Some(Value::Null) => Ok(OutputFormat::JsonObject),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(OutputFormat::JsonSchema(schema.clone()))
                }
                Some(other) => Err(ApiError::field(
                    P,
                    format!(
                        "`response_format.json_schema.schema` must be a JSON schema object; got {}",
                        type_name(other)
                    ),
                )),
            }
        }
        other => Err(ApiError::field(
            P,
            format!(
                "response_format {} is not supported; use {{\"type\": \"text\"}}, \
                 {{\"type\": \"json_object\"}} or {{\"type\": \"json_schema\", …}}",
                other.map_or("without a type".to_owned(), |t| format!("`{t}`"))
            ),
        )),
    }
}

/// `tools`: function tools, each with a name (and optionally a parameter schema).
fn parse_tools(list: &[Value]) -> Result<Vec<Value>, ApiError> {
    for (i, t) in list.iter().enumerate() {
        let bad = |what: &str| ApiError::field("tools", format!("tool {i} {what}"));
        let kind = t.get("type").and_then(Value::as_str);
        if kind != Some("function") {
            return Err(bad(
                "must be {\"type\": \"function\", \"function\": {\"name\": …, \"parameters\": …}}",
            ));
        }
        let func = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("has no `function` object"))?;
        match func.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => return Err(bad("has no `function.name`")),
        }
        match func.get("parameters") {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => {
                return Err(bad(
                    "has `function.parameters` that is not a JSON schema object",
                ))
            }
        }
    }
    Ok(list.to_vec())
}

/// `tool_choice`: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}.
fn parse_tool_choice(f: &Fields, tools: Option<&[Value]>) -> Result<ToolChoice, ApiError> {
    const P: &str = "tool_choice";
    let choice = match f.get(P) {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::field(
                    P,
                    format!(
                        "`tool_choice` {other:?} is not one of \"none\", \"auto\", \"required\" \
                         or a function object"
                    ),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::field(
                        P,
                        "a `tool_choice` object must be {\"type\": \"function\", \"function\": \
                         {\"name\": …}}",
                    )
                })?;
            ToolChoice::Function(name.to_owned())
        }
        Some(other) => {
            return Err(ApiError::field(
                P,
                format!(
                    "`tool_choice` must be a string or an object; got {}",
                    type_name(other)
                ),
            ))
        }
    };
    let names = || {
        tools
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
    };
    match &choice {
        ToolChoice::Required if names().next().is_none() => Err(ApiError::field(
            P,
            "`tool_choice` \"required\" needs at least one tool in `tools`",
        )),
        ToolChoice::Function(want) if !names().any(|n| n == want) => Err(ApiError::field(
            P,
            format!("`tool_choice` names the function {want:?}, which is not in `tools`"),
        )),
        _ => Ok(choice),
    }
}

/// Assistant messages carry `tool_calls[].function.arguments` as a JSON string (OpenAI's
/// shape); templates print them with `tojson`, so they get the object the string encodes.
fn tool_call_arguments_as_objects(message: &Value) -> Value {
    let mut m = message.clone();
    if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
        for call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments") {
                if let Some(parsed) = args
                    .as_str()
                    .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    .filter(Value::is_object)
                {
                    *args = parsed;
                }
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().expect("test body is an object").clone()
    }

    fn chat(v: Value) -> Result<Params, ApiError> {
        parse_chat(&obj(v))
    }

    fn completion(v: Value) -> Result<Params, ApiError> {
        parse_completion(&obj(v))
    }

    fn user() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn chat_fields_are_read() {
        let p = chat(json!({
            "model": "m", "messages": user(), "temperature": 0, "top_p": 0.5, "top_k": 7,
            "min_p": 0.1, "seed": -1, "stop": "\n", "max_tokens": 9, "n": 2,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"42": -100},
            "stream": true, "stream_options": {"include_usage": true},
            "logprobs": true, "top_logprobs": 3, "user": "ignored"
        }))
        .unwrap();
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_p, 0.5);
        assert_eq!(p.sampling.top_k, 7);
        assert_eq!(p.sampling.min_p, 0.1);
        assert_eq!(p.sampling.presence_penalty, 0.5);
        assert_eq!(p.sampling.frequency_penalty, -0.5);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.stop, vec!["\n".to_owned()]);
        assert_eq!(p.max_tokens, Some(9));
        assert_eq!(p.n, 2);
        assert_eq!(p.logit_bias, vec![(42, -100.0)]);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.logprobs, Some(3));
        assert!(
            matches!(p.prompt, Prompt::Chat { ref messages, tools: None } if messages.len() == 1)
        );
    }

    #[test]
    fn chat_defaults_and_aliases() {
        let p = chat(
            json!({"messages": user(), "max_tokens": 5, "max_completion_tokens": 7,
                            "stop": ["a", "b"], "logprobs": true, "tools": []}),
        )
        .unwrap();
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.logprobs, Some(0));
        assert_eq!(p.n, 1);
        assert!(!p.stream && !p.include_usage);
        assert_eq!(
            p.sampling.temperature,
            SamplingParams::default().temperature
        );
        // Nulls are absent fields (clients send them).
        let p = chat(json!({"messages": user(), "temperature": null, "stop": null})).unwrap();
        assert!(p.stop.is_empty());
    }

    #[track_caller]
    fn rejects(r: Result<Params, ApiError>, param: &str, needle: &str) {
        crate::error::assert_refused(&r.expect_err("should be refused"), param, needle);
    }

    #[test]
    fn chat_mistakes_name_their_field() {
        rejects(chat(json!({})), "messages", "required");
        rejects(chat(json!({"messages": []})), "messages", "empty");
        rejects(chat(json!({"messages": ["hi"]})), "messages", "message 0");
        rejects(chat(json!({"messages": "hi"})), "messages", "array");
        let m = user();
        rejects(
            chat(json!({"messages": m, "temperature": "hot"})),
            "temperature",
            "\"hot\"",
        );
        rejects(
            chat(json!({"messages": m, "temperature": 3})),
            "temperature",
            "0 to 2",
        );
        rejects(
            chat(json!({"messages": m, "top_p": 1.5})),
            "top_p",
            "0 to 1",
        );
        rejects(chat(json!({"messages": m, "n": 0})), "n", "integer");
        rejects(chat(json!({"messages": m, "n": 1.5})), "n", "integer");
        rejects(
            chat(json!({"messages": m, "max_tokens": 0})),
            "max_tokens",
            "integer from 1",
        );
        rejects(chat(json!({"messages": m, "stop": 3})), "stop", "string");
        rejects(chat(json!({"messages": m, "stop": [""]})), "stop", "empty");
        rejects(
            chat(json!({"messages": m, "stream": "yes"})),
            "stream",
            "true or false",
        );
        rejects(chat(json!({"messages": m, "seed": "x"})), "seed", "integer");
        rejects(
            chat(json!({"messages": m, "logit_bias": {"abc": 1}})),
            "logit_bias",
            "token ids",
        );
        rejects(
            chat(json!({"messages": m, "logit_bias": {"1": 500}})),
            "logit_bias",
            "-100",
        );
        rejects(
            chat(json!({"messages": m, "top_logprobs": 2})),
            "top_logprobs",
            "logprobs",
        );
        rejects(
            chat(json!({"messages": m, "logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
            "0 to 20",
        );
        rejects(
            chat(json!({"messages": m, "response_format": {"type": "yaml"}})),
            "response_format",
            "yaml",
        );
        rejects(
            chat(json!({"messages": m, "response_format": {"type": "json_schema"}})),
            "response_format",
            "json_schema",
        );
        rejects(
            chat(json!({"messages": m, "tools": [{"type": "function"}]})),
            "tools",
            "tool 0",
        );
        rejects(
            chat(json!({"messages": m, "tool_choice": "required"})),
            "tool_choice",
            "at least one tool",
        );
        rejects(
            chat(
                json!({"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}],
                        "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
            "\"g\"",
        );
        rejects(
            chat(json!({"messages": m, "stream_options": {"include_usage": 1}})),
            "stream_options",
            "include_usage",
        );
        rejects(chat(json!({"messages": m, "model": 5})), "model", "string");
    }

    #[test]
    fn completion_prompts() {
        let p = completion(json!({"prompt": "abc"})).unwrap();
        assert_eq!(p.prompt, Prompt::Text("abc".into()));
        assert_eq!(p.max_tokens, None);
        let p = completion(json!({"prompt": ["abc"]})).unwrap();
        assert_eq!(p.prompt, Prompt::Text("abc".into()));
        let p = completion(json!({"prompt": [1, 2, 3]})).unwrap();
        assert_eq!(p.prompt, Prompt::Tokens(vec![1, 2, 3]));
        let p = completion(json!({"prompt": [[4, 5]], "echo": true, "logprobs": 2})).unwrap();
        assert_eq!(p.prompt, Prompt::Tokens(vec![4, 5]));
        assert!(p.echo);
        assert_eq!(p.logprobs, Some(2));
        rejects(completion(json!({})), "prompt", "required");
        rejects(
            completion(json!({"prompt": ["a", "b"]})),
            "prompt",
            "one prompt",
        );
        rejects(
            completion(json!({"prompt": [1, -2]})),
            "prompt",
            "non-negative",
        );
        rejects(completion(json!({"prompt": []})), "prompt", "empty");
        rejects(completion(json!({"prompt": 7})), "prompt", "a number");
        rejects(
            completion(json!({"prompt": "a", "logprobs": true})),
            "logprobs",
            "integer",
        );
        rejects(
            completion(json!({"prompt": "a", "best_of": 2})),
            "best_of",
            "best_of",
        );
        rejects(
            completion(json!({"prompt": "a", "suffix": "z"})),
            "suffix",
            "suffix",
        );
    }
}
