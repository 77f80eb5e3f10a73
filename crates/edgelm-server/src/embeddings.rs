//! `/v1/embeddings`: the request body (`input` as a string, strings, token ids or lists of token
//! ids; `encoding_format`) checked field by field, and the response in OpenAI's shape with the
//! vectors as JSON floats or base64 of little-endian f32.

use crate::api::token_ids;
use crate::error::{type_name, ApiError};
use serde_json::{Map, Value};

/// Inputs one request may embed at most.
pub const MAX_INPUTS: usize = 256;

/// One input, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// `encoding_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

/// A validated `/v1/embeddings` request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingParams {
    pub model: Option<String>,
    pub inputs: Vec<Input>,
    pub encoding: Encoding,
}

const INPUT_SHAPES: &str =
    "a string, a list of strings, a list of token ids, or a list of lists of token ids";

/// Parse a `/v1/embeddings` body. Fields this server does not use (`user`) are ignored;
/// `dimensions` is refused, as the model's vectors cannot be shortened.
pub fn parse(body: &Map<String, Value>) -> Result<EmbeddingParams, ApiError> {
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    let model = match get("model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ApiError::field(
                "model",
                format!("`model` must be a string; got {}", type_name(v)),
            ))
        }
    };
    let encoding = match get("encoding_format") {
        None => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(v) => {
            return Err(ApiError::field(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\"; got {v}"),
            ))
        }
    };
    if get("dimensions").is_some() {
        return Err(ApiError::field(
            "dimensions",
            "`dimensions` is not supported: this server returns the model's whole embedding; \
             leave it out",
        ));
    }
    let inputs = match get("input") {
        None => {
            return Err(ApiError::field(
                "input",
                format!("`input` is required: {INPUT_SHAPES}"),
            ))
        }
        Some(v) => inputs(v)?,
    };
    Ok(EmbeddingParams {
        model,
        inputs,
        encoding,
    })
}

fn inputs(v: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = |msg: String| ApiError::field("input", msg);
    let list = match v {
        Value::String(s) if s.is_empty() => {
            return Err(bad("`input` is an empty string; give text to embed".into()))
        }
        Value::String(s) => return Ok(vec![Input::Text(s.clone())]),
        Value::Array(list) => list,
        other => {
            return Err(bad(format!(
                "`input` must be {INPUT_SHAPES}; got {}",
                type_name(other)
            )))
        }
    };
    let Some(first) = list.first() else {
        return Err(bad(
            "`input` is an empty list; give at least one text or list of token ids".into(),
        ));
    };
    if first.is_number() {
        return token_ids(list, "input", "`input`").map(|t| vec![Input::Tokens(t)]);
    }
    if list.len() > MAX_INPUTS {
        return Err(bad(format!(
            "`input` holds {} items; this server embeds at most {MAX_INPUTS} per request: \
             split them over several requests",
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| match (first, item) {
            (Value::String(_), Value::String(s)) if s.is_empty() => Err(bad(format!(
                "`input[{i}]` is an empty string; give text to embed"
            ))),
            (Value::String(_), Value::String(s)) => Ok(Input::Text(s.clone())),
            (Value::Array(_), Value::Array(ids)) if ids.is_empty() => Err(bad(format!(
                "`input[{i}]` is an empty list; give at least one token id"
            ))),
            (Value::Array(_), Value::Array(ids)) => {
                token_ids(ids, "input", &format!("`input[{i}]`")).map(Input::Tokens)
            }
            (Value::String(_) | Value::Array(_), other) => Err(bad(format!(
                "`input[{i}]` is {}, but `input[0]` is {}: every item must be of one kind, \
                 {INPUT_SHAPES}",
                type_name(other),
                type_name(first)
            ))),
            (other, _) => Err(bad(format!(
                "`input` must be {INPUT_SHAPES}; got a list of {}",
                type_name(other)
            ))),
        })
        .collect()
}

/// Refuse every input as long as the context or longer before any is computed (the engine
/// would refuse each alone, after embedding the ones before it).
pub fn check_lengths(prompts: &[Vec<u32>], n_ctx: usize) -> Result<(), ApiError> {
    match prompts.iter().enumerate().find(|(_, p)| p.len() >= n_ctx) {
        None => Ok(()),
        Some((i, p)) => {
            let which = if prompts.len() == 1 {
                "`input`".to_owned()
            } else {
                format!("`input[{i}]`")
            };
            Err(ApiError::field(
                "input",
                format!(
                    "this model's maximum context length is {n_ctx} tokens, but {which} has {} \
                     tokens; shorten it or raise --ctx",
                    p.len()
                ),
            )
            .code("context_length_exceeded"))
        }
    }
}

/// The response body. Written by hand so floats keep their shortest f32 form (a `Value`
/// would widen them to f64's digits).
pub fn response(
    model: &str,
    vectors: &[Vec<f32>],
    encoding: Encoding,
    prompt_tokens: usize,
) -> String {
    let mut data = Vec::with_capacity(vectors.len());
    for (i, v) in vectors.iter().enumerate() {
        let embedding = match encoding {
            // serde_json writes f32 with ryu's f32 digits (and a non-finite value as null).
            Encoding::Float => {
                serde_json::to_string(v).expect("a list of floats always serializes")
            }
            Encoding::Base64 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                format!("\"{}\"", base64(&bytes))
            }
        };
        data.push(format!(
            r#"{{"object":"embedding","index":{i},"embedding":{embedding}}}"#
        ));
    }
    format!(
        r#"{{"object":"list","data":[{}],"model":{},"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#,
        data.join(","),
        Value::from(model)
    )
}

/// Standard base64 with padding (RFC 4648), as OpenAI's clients decode it.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| chunk.get(i).copied().unwrap_or(0) as u32;
        let n = b(0) << 16 | b(1) << 8 | b(2);
        // n bytes carry n + 1 symbols; the rest of the quartet is padding.
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<EmbeddingParams, ApiError> {
        match v {
            Value::Object(map) => parse(&map),
            _ => panic!("test bodies are objects"),
        }
    }

    fn inputs_of(v: Value) -> Vec<Input> {
        parse_json(json!({ "input": v })).unwrap().inputs
    }

    #[track_caller]
    fn rejects(body: Value, param: &str, needle: &str) {
        crate::error::assert_refused(&parse_json(body).unwrap_err(), param, needle);
    }

    #[test]
    fn every_input_shape_is_read() {
        let text = |s: &str| Input::Text(s.into());
        assert_eq!(inputs_of(json!("a cat")), [text("a cat")]);
        assert_eq!(inputs_of(json!(["a", "b"])), [text("a"), text("b")]);
        assert_eq!(inputs_of(json!([1, 2, 3])), [Input::Tokens(vec![1, 2, 3])]);
        assert_eq!(
            inputs_of(json!([[1, 2], [3]])),
            [Input::Tokens(vec![1, 2]), Input::Tokens(vec![3])]
        );
        let p = parse_json(json!({"input": "x", "model": "m", "user": "u",
                                  "encoding_format": "base64"}))
        .unwrap();
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.encoding, Encoding::Base64);
        let p = parse_json(json!({"input": "x", "encoding_format": null})).unwrap();
        assert_eq!(p.encoding, Encoding::Float);
        // A list of token ids is one input, however long.
        let ids: Vec<u32> = (0..MAX_INPUTS as u32 + 10).collect();
        assert_eq!(inputs_of(json!(ids)), [Input::Tokens(ids)]);
    }

    #[test]
    fn mistakes_name_their_field() {
        rejects(json!({}), "input", "required");
        rejects(json!({"input": null}), "input", "required");
        rejects(json!({"input": ""}), "input", "empty string");
        rejects(json!({"input": []}), "input", "empty list");
        rejects(
            json!({"input": ["a", ""]}),
            "input",
            "`input[1]` is an empty string",
        );
        rejects(
            json!({"input": [[1], []]}),
            "input",
            "`input[1]` is an empty list",
        );
        rejects(json!({"input": 5}), "input", "got a number");
        rejects(json!({"input": [{"a": 1}]}), "input", "a list of an object");
        rejects(
            json!({"input": ["a", 1]}),
            "input",
            "`input[1]` is a number",
        );
        rejects(
            json!({"input": [[1], "a"]}),
            "input",
            "`input[1]` is a string",
        );
        rejects(json!({"input": [1, -2]}), "input", "got -2");
        rejects(json!({"input": [1, 2.5]}), "input", "got 2.5");
        rejects(
            json!({"input": [[1, 1e10]]}),
            "input",
            "`input[0]` must hold",
        );
        let many = vec!["x"; MAX_INPUTS + 1];
        rejects(json!({ "input": many }), "input", "at most 256");
        assert!(parse_json(json!({ "input": vec!["x"; MAX_INPUTS] })).is_ok());
        rejects(
            json!({"input": "x", "dimensions": 64}),
            "dimensions",
            "not supported",
        );
        rejects(
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
            "\"int8\"",
        );
        rejects(
            json!({"input": "x", "encoding_format": 1}),
            "encoding_format",
            "got 1",
        );
        rejects(json!({"input": "x", "model": 3}), "model", "a number");
    }

    #[test]
    fn inputs_must_fit_the_context() {
        assert!(check_lengths(&[vec![1; 7], vec![1; 3]], 8).is_ok());
        let e = check_lengths(&[vec![1; 7], vec![1; 8]], 8).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("input"));
        assert!(
            e.message.contains("`input[1]` has 8 tokens"),
            "{}",
            e.message
        );
        let e = check_lengths(&[vec![1; 9]], 8).unwrap_err();
        assert!(e.message.contains("`input` has 9 tokens"), "{}", e.message);
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
    }

    #[test]
    fn response_has_openai_shape() {
        let vectors = [vec![0.1f32, -0.5], vec![1.0, 0.0]];
        let body: Value =
            serde_json::from_str(&response("m\"x", &vectors, Encoding::Float, 7)).unwrap();
        assert_eq!(
            body,
            json!({"object": "list", "model": "m\"x",
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.5]},
                            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}],
                   "usage": {"prompt_tokens": 7, "total_tokens": 7}})
        );
        let body: Value =
            serde_json::from_str(&response("m", &vectors[1..], Encoding::Base64, 2)).unwrap();
        assert_eq!(body["data"][0]["embedding"], "AACAPwAAAAA=");
    }
}
