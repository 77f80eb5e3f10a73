//! `/openapi.json`: an OpenAPI 3.1 description of exactly the routes and fields served.

use serde_json::{json, Value};

/// Every route `lib.rs` builds, as (method, path), for the tests that hold the router and this
/// document to each other.
#[cfg(test)]
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model}"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("post", "/v1/sessions/{name}"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// `responses` of an operation: `ok` as 200, and the OpenAI-shaped errors of `codes`.
fn responses(ok: Value, codes: &[&str]) -> Value {
    let text = |c: &str| match c {
        "400" => {
            "Malformed JSON, a field of the wrong type or range, or a prompt longer than \
                  the context (code `context_length_exceeded`)"
        }
        "401" => "Missing or wrong API key (code `invalid_api_key`)",
        "404" => "Unknown model (code `model_not_found`) or route",
        "413" => "Request body over 8 MiB (code `request_too_large`)",
        "429" => "Queue full (code `queue_full`); retry after the `Retry-After` seconds",
        "500" => "The engine failed",
        "503" => "The engine is not taking requests",
        _ => "Error",
    };
    std::iter::once(("200".to_owned(), ok))
        .chain(codes.iter().map(|&c| {
            (
                c.to_owned(),
                json!({"description": text(c), "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}),
            )
        }))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn sampling_properties() -> Value {
    json!({
        "model": {"type": "string", "description": "The served model's name; others are 404."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.8,
                        "description": "0 is greedy."},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.95},
        "top_k": {"type": "integer", "minimum": 0, "default": 40, "description": "0 disables."},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.05},
        "repeat_penalty": {"type": "number", "minimum": 0, "maximum": 10, "default": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
        "seed": {"type": "integer", "description": "The same seed gives the same text; \
                 random when absent."},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string", "minLength": 1},
                            "maxItems": 16}],
                 "description": "Text that ends a choice; not included in it."},
        "n": {"type": "integer", "minimum": 1, "default": 1,
              "description": "Choices; they share the prompt's KV blocks."},
        "logit_bias": {"type": "object", "additionalProperties":
                       {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "Token id (as a string) → bias added to its logit."},
        "ignore_eos": {"type": "boolean", "default": false},
        "stream": {"type": "boolean", "default": false,
                   "description": "Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean",
                           "description": "Chunks carry `usage: null`; a last chunk with \
                           `choices: []` carries the usage."}}},
    })
}

fn embeddings() -> Value {
    let ids = json!({"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": 0}});
    let schema = json!({"type": "object", "required": ["input"], "properties": {
        "input": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": crate::embeddings::MAX_INPUTS,
             "items": {"type": "string", "minLength": 1}},
            ids.clone(),
            {"type": "array", "minItems": 1, "maxItems": crate::embeddings::MAX_INPUTS,
             "items": ids}],
            "description": "Text or token ids; a list embeds each item. Each must be shorter \
                            than the context."},
        "model": {"type": "string", "description": "The served model's name; others are 404."},
        "encoding_format": {"enum": ["float", "base64"], "default": "float",
            "description": "base64: the little-endian f32 bytes of each vector."},
        "dimensions": {"not": {}, "description": "Not supported: the whole vector comes back."},
        "user": {"type": "string", "description": "Ignored."},
    }});
    let responses = responses(
        json!({"description": "A list of embeddings: the final hidden \
        states pooled as the model's `pooling_type` says (mean when absent), unit length.",
        "content": {"application/json": {"schema": {"type": "object"}}}}),
        &["400", "401", "404", "413", "429", "500", "503"],
    );
    json!({"post": {"summary": "Embeddings (OpenAI's shape).",
        "requestBody": {"required": true, "content": {"application/json": {"schema": schema}}},
        "responses": responses}})
}

/// `response_format`, on both generation endpoints: enforced token by token.
fn response_format() -> Value {
    json!({"type": "object", "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {
            "name": {"type": "string"}, "schema": {"type": "object"},
            "strict": {"type": "boolean"}}}},
        "required": ["type"]})
}

/// `/v1/sessions/{name}`: save or restore a conversation's KV state.
fn sessions() -> Value {
    let responses = responses(
        json!({"description": "`{\"name\", \"action\", \"tokens\"}`: \
        positions saved, or tokens restored into the prefix cache.",
        "content": {"application/json": {"schema": {"type": "object"}}}}),
        &["400", "401", "404", "413", "500", "503"],
    );
    json!({"post": {
        "summary": "Save a conversation's KV state to the server's --session-dir, or restore \
            it into the prefix cache (a later request starting with it is not recomputed).",
        "parameters": [
            {"name": "name", "in": "path", "required": true,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"}},
            {"name": "action", "in": "query", "required": true,
             "schema": {"enum": ["save", "restore"]}}],
        "requestBody": {"required": false, "content": {"application/json": {"schema": {
            "type": "object", "description": "For save: the conversation, as a chat request's \
                `messages` (and `tools`), or a `prompt` string.",
            "properties": {"messages": {"type": "array"}, "tools": {"type": "array"},
                           "prompt": {"type": "string"}}}}}},
        "responses": responses}})
}

/// The document for a server of `model` whose sequences hold `n_ctx` positions.
pub fn document(model: &str, n_ctx: usize, auth: bool) -> Value {
    let mut chat = sampling_properties();
    let chat_props = chat.as_object_mut().expect("an object literal");
    for (k, v) in [
        (
            "messages",
            json!({"type": "array", "minItems": 1, "items": {"type": "object",
            "properties": {"role": {"type": "string"}, "content": {"oneOf": [
                {"type": "string"}, {"type": "null"},
                {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"const": "text"}, "text": {"type": "string"}}}}]}},
            "required": ["role"]},
            "description": "Rendered through the model's chat template."}),
        ),
        (
            "tools",
            json!({"type": "array", "items": {"type": "object", "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"},
                    "parameters": {"type": "object"}}, "required": ["name"]}},
                "required": ["type", "function"]},
            "description": "Rendered through the chat template (or described in the system \
                message where the template has no tools); calls are parsed into `tool_calls`."}),
        ),
        (
            "tool_choice",
            json!({"oneOf": [{"enum": ["none", "auto", "required"]},
                {"type": "object", "properties": {"type": {"const": "function"},
                 "function": {"type": "object", "properties": {"name": {"type": "string"}},
                 "required": ["name"]}}}],
            "description": "`required` and a named function constrain the answer to calls \
                whose arguments follow the tool's parameter schema."}),
        ),
        (
            "max_completion_tokens",
            json!({"type": "integer", "minimum": 1,
            "description": "Default: until the end of the context."}),
        ),
        (
            "max_tokens",
            json!({"type": "integer", "minimum": 1, "deprecated": true}),
        ),
        ("logprobs", json!({"type": "boolean", "default": false})),
        (
            "top_logprobs",
            json!({"type": "integer", "minimum": 0, "maximum": 20}),
        ),
        ("response_format", response_format()),
    ] {
        chat_props.insert(k.to_owned(), v);
    }
    let mut completion = sampling_properties();
    let completion_props = completion.as_object_mut().expect("an object literal");
    for (k, v) in [
        (
            "prompt",
            json!({"oneOf": [{"type": "string"},
            {"type": "array", "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "items": {"type": "string"}, "maxItems": 1},
            {"type": "array", "items": {"type": "array", "items": {"type": "integer"}},
             "maxItems": 1}],
            "description": "One prompt: text or token ids."}),
        ),
        (
            "max_tokens",
            json!({"type": "integer", "minimum": 1, "default": 16}),
        ),
        (
            "logprobs",
            json!({"type": "integer", "minimum": 0, "maximum": 20,
            "description": "Log-probability of each token and this many alternatives."}),
        ),
        (
            "echo",
            json!({"type": "boolean", "default": false, "description":
            "Return the prompt before the completion; with `logprobs`, its tokens' \
             log-probabilities too (the first one's is null)."}),
        ),
        ("response_format", response_format()),
    ] {
        completion_props.insert(k.to_owned(), v);
    }
    let generation = |summary: &str, schema: Value, response: &str| {
        let responses = responses(
            json!({"description": response, "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}}}}),
            &["400", "401", "404", "413", "429", "500", "503"],
        );
        json!({"post": {"summary": summary,
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema}}},
            "responses": responses}})
    };
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "edgelm",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("OpenAI-compatible API serving `{model}` on the CPU; \
                                    {n_ctx} positions per sequence."),
        },
        "paths": {
            "/health": {"get": {"summary": "Liveness; needs no API key.", "security": [],
                "responses": {"200": {"description": "{\"status\": \"ok\"}"}}}},
            "/v1/models": {"get": {"summary": "The served model.",
                "responses": {"200": {"description": "A list of one model."}}}},
            "/v1/models/{model}": {"get": {"summary": "The served model, by name.",
                "parameters": [{"name": "model", "in": "path", "required": true,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model."},
                              "404": {"description": "Unknown model."}}}},
            "/v1/chat/completions": generation("Chat completion (OpenAI's shape).",
                json!({"type": "object", "required": ["messages"], "properties": chat}),
                "A chat.completion, or chat.completion.chunk events when streaming."),
            "/v1/completions": generation("Text completion (OpenAI's legacy shape).",
                json!({"type": "object", "required": ["prompt"], "properties": completion}),
                "A text_completion, or text_completion chunk events when streaming."),
            "/v1/embeddings": embeddings(),
            "/v1/sessions/{name}": sessions(),
            "/metrics": {"get": {"summary": "Prometheus metrics: requests by status, tokens, \
                queue, running sequences, KV blocks, time to first token and inter-token \
                latency.", "responses": {"200": {"description": "Prometheus text format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1."}}}},
        },
        "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {
            "type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}},
    });
    if auth {
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"bearer": []}]);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_exactly_the_routes() {
        let doc = document("m", 4096, true);
        let mut described: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        described.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(described, routes);
        assert_eq!(doc["security"], json!([{"bearer": []}]));
        assert!(document("m", 1, false).get("security").is_none());
    }
}
