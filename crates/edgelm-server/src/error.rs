//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the JSON
//! body extractor that reports malformed bodies in that shape (axum's own rejections are plain
//! text).

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use edgelm_engine::SubmitError;
use serde_json::{json, Value};

/// A request that cannot be served, as the client will see it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, …
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is wrong; the message says how.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).param(param)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    pub fn model_not_found(model: &str, served: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{model}` does not exist here; this server serves `{served}`"),
        )
        .param("model")
        .code("model_not_found")
    }

    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}; see /openapi.json for the methods served"),
        )
        .code("method_not_allowed")
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than the limit of {} MiB; send a shorter prompt",
                limit >> 20
            ),
        )
        .code("request_too_large")
    }

    /// 500: the server failed, not the client.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 503: the engine is not taking requests (shutting down or stopped).
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.retry_after = Some(1);
        e
    }

    pub fn param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_owned());
        self
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The `{"error": …}` object (also the payload of an SSE error event).
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// Why the scheduler refused a request, for the field that carried the prompt.
    pub fn from_submit(e: SubmitError, prompt_param: &str) -> ApiError {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull(_) => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!("{message} (the server is at its --parallel and --queue limits)"),
                )
                .code("queue_full");
                e.retry_after = Some(1);
                e
            }
            SubmitError::EmptyPrompt => ApiError::field(prompt_param, message),
            SubmitError::PromptTooLong { .. } => {
                ApiError::field(prompt_param, message).code("context_length_exceeded")
            }
            SubmitError::Invalid(_) => ApiError::invalid(message),
        }
    }
}

/// Test helper: `e` is a 400 naming `param`, and its message says `needle`.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_refused(e: &ApiError, param: &str, needle: &str) {
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
    assert!(
        e.message.contains(needle),
        "{:?} lacks {needle:?}",
        e.message
    );
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = Response::new(Body::from(self.body().to_string()));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// A request body that must be one JSON object. Too large → 413, anything else wrong → 400,
/// both in OpenAI's shape.
pub struct JsonBody(pub serde_json::Map<String, Value>);

/// Request bodies are refused past this size.
pub const BODY_LIMIT: usize = 8 << 20;

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(BODY_LIMIT)
            } else {
                ApiError::invalid(format!(
                    "reading the request body failed: {}",
                    r.body_text()
                ))
            }
        })?;
        parse_object(&bytes).map(JsonBody)
    }
}

/// The body as a JSON object, or a 400 that says where it is malformed.
pub fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::invalid(format!(
            "the request body must be a JSON object, not {}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::invalid(format!(
            "the request body is not valid JSON ({e}); send a JSON object with \
             Content-Type: application/json"
        ))),
    }
}

/// How a JSON value's type is named in messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let e = ApiError::field("temperature", "temperature must be a number").code("x");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "temperature must be a number",
                             "type": "invalid_request_error", "param": "temperature",
                             "code": "x"}})
        );
        let e = ApiError::invalid("bad");
        assert_eq!(e.body()["error"]["param"], Value::Null);
        assert_eq!(e.body()["error"]["code"], Value::Null);
    }

    #[test]
    fn submit_errors_map_to_statuses_and_codes() {
        let e = ApiError::from_submit(
            SubmitError::PromptTooLong {
                prompt: 5000,
                n_ctx: 4096,
            },
            "messages",
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("5000") && e.message.contains("4096"));

        let e = ApiError::from_submit(SubmitError::QueueFull(16), "prompt");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.retry_after, Some(1));
        let res = e.into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");

        let e = ApiError::from_submit(SubmitError::Invalid("n must be…".into()), "prompt");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(parse_object(br#"{"a": 1}"#).is_ok());
        let e = parse_object(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_object(b"[1, 2]").unwrap_err();
        assert!(e.message.contains("an array"), "{}", e.message);
    }
}
