//! `edgelm serve`: an OpenAI-compatible HTTP API over the engine's step-wise scheduler.
//!
//! Threads: one engine thread owns the [`Scheduler`] (and through it the compute pool) and
//! steps it; one tokio thread parses and validates requests, renders chat templates,
//! tokenizes, and turns engine events into responses. A submission crosses to the engine over
//! a channel and its acceptance (or a queue-full / too-long refusal) comes back through a
//! oneshot, so refusals are ordinary HTTP statuses; events come back over a per-request
//! channel, and dropping its receiver (a client that disconnects) cancels the request.

/// Request bodies of `/v1/chat/completions` and `/v1/completions` and their validation:
/// [`api::parse_body`] is exactly what the server does with the bytes of a request before it
/// tokenizes anything. Public for the fuzz targets in `fuzz/`; not a stable API.
pub mod api;
mod embeddings;
mod engine_thread;
mod error;
mod metrics;
mod openapi;
mod response;
mod shaping;

use anyhow::{bail, Context as _};
use api::{Kind, Params, Prompt};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use edgelm_chat::tools::ToolCallFormat;
use edgelm_chat::ChatTemplate;
use edgelm_engine::{Engine, Event, Request, Rng, Scheduler, SchedulerConfig};
use edgelm_grammar::GrammarCompiler;
use edgelm_tokenizer::{Encode, Tokenizer};
use engine_thread::{Job, Limits, SessionAction, SessionJob, Submission};
pub use error::ApiError;
use error::{JsonBody, BODY_LIMIT};
use metrics::Metrics;
use response::{Assembler, Echo, Reply, SseBody};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// The built-in chat page served at `/` (static; it talks to the /v1 routes like any client).
const CHAT_PAGE: &str = include_str!("web/chat.html");

/// Tokens one step computes at most: a decode token per running sequence, the rest prefill.
const STEP_TOKENS: usize = 512;

/// Options of `edgelm serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (the default serves this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the chat page at /.
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// Sequences generating at once (a request with `n` choices counts `n`).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context positions per sequence (0: the model's trained length).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Memory for the KV cache, as bytes or with a unit: 512M, 2G (default: --parallel × --ctx
    /// positions).
    #[arg(long = "kv-budget", value_parser = parse_size)]
    pub kv_budget: Option<u64>,
    /// Requests waiting for a place; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Directory of session files for `POST /v1/sessions/{name}?action=save|restore` (without
    /// it, that route answers that sessions are off).
    #[arg(long = "session-dir", value_name = "DIR")]
    pub session_dir: Option<std::path::PathBuf>,
    /// When a request's generation fills its context: keep its first --keep tokens, drop the
    /// older half of the rest, re-rotate the kept keys and go on (llama-server's
    /// --context-shift). Without it, a max_tokens the context cannot hold is refused (400).
    #[arg(long = "context-shift")]
    pub context_shift: bool,
    /// Tokens at the start of a request a context shift never drops.
    #[arg(long, default_value_t = 0, requires = "context_shift")]
    pub keep: usize,
}

/// A size in bytes: a number with an optional binary unit (K, M, G, T; `KiB`, `MB` … alike).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size; write bytes or a number with K, M, G or T (512M, 2G)")
    })?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use K, M, G or T (512M, 2G)"
            ))
        }
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!(
            "{s:?} is not a usable size; give at least one byte"
        ));
    }
    Ok(bytes as u64)
}

/// What handlers share.
struct App {
    /// The name the model is served under, and the names `model` may also give.
    model: String,
    aliases: Vec<String>,
    created: u64,
    api_key: Option<String>,
    tokenizer: Arc<Tokenizer>,
    /// The chat template, or why it cannot be used.
    template: Result<Arc<ChatTemplate>, String>,
    /// The syntax the model writes tool calls in, chosen from its template.
    tool_format: ToolCallFormat,
    /// Its opening marker's id where that is a control token (grammars name it by id).
    tool_marker: Option<u32>,
    /// Grammars over this model's vocabulary, or why there are none.
    grammar: Result<GrammarCompiler, String>,
    n_ctx: usize,
    /// A full context shifts instead of ending the request (`--context-shift`).
    context_shift: bool,
    /// Sequences the engine runs at once (`--parallel`).
    parallel: usize,
    engine: std::sync::mpsc::Sender<Job>,
    /// Where `/v1/sessions/{name}` keeps session files (None: sessions are off).
    session_dir: Option<std::path::PathBuf>,
    metrics: Arc<Metrics>,
    openapi: Value,
    /// Mixed into request ids and default seeds.
    salt: u64,
    counter: AtomicU64,
}

impl App {
    /// A fresh pseudo-random number (ids, seeds of requests that give none).
    fn random(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Rng::new(self.salt ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model && !self.aliases.iter().any(|a| a == m) => {
                Err(ApiError::model_not_found(m, &self.model))
            }
            _ => Ok(()),
        }
    }

    fn model_object(&self) -> Value {
        json!({"id": self.model, "object": "model", "created": self.created, "owned_by": "edgelm"})
    }

    /// The conversation's prompt tokens. This is `Engine::encode_chat` done here, where
    /// requests are parsed, because the engine itself belongs to the engine thread: the
    /// template renders with the assistant turn opened, special tokens are parsed, and BOS is
    /// added unless the template wrote it.
    fn encode_chat(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
    ) -> Result<Vec<u32>, ApiError> {
        let template = self.template.as_ref().map_err(|reason| {
            ApiError::internal(format!(
                "this model's chat template cannot be used ({reason}); send the prompt as text \
                 to /v1/completions"
            ))
        })?;
        let text = template
            .render_prompt(messages, tools)
            .map_err(|e| ApiError::field("messages", e.to_string()))?;
        edgelm_engine::encode_rendered_chat(&self.tokenizer, &text).map_err(|e| {
            ApiError::field(
                "messages",
                format!("tokenizing the conversation failed: {e}"),
            )
        })
    }
}

/// The name a model is served under: a path's file stem, or the name as given.
fn served_name(given: &str) -> String {
    let p = Path::new(given);
    let gguf = p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let is_path = gguf || given.contains(std::path::MAIN_SEPARATOR) || given.contains('/');
    match p.file_stem().and_then(|s| s.to_str()) {
        Some(stem) if is_path => stem.to_owned(),
        _ => given.to_owned(),
    }
}

/// Serve `engine` until SIGINT or SIGTERM; in-flight requests finish first (a second signal
/// stops at once).
pub fn serve(engine: Engine, model_name: String, args: ServeArgs) -> anyhow::Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if let Some(dir) = &args.session_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the session directory {}", dir.display()))?;
    }
    let model = served_name(&model_name);
    let aliases = if model == model_name {
        Vec::new()
    } else {
        vec![model_name.clone()]
    };
    let tokenizer = engine.tokenizer.clone();
    let template = engine.chat_template().map_err(|e| e.to_string());
    let template_source = tokenizer.chat_template().unwrap_or("");
    let tool_format = ToolCallFormat::detect(template_source);
    let tool_marker = edgelm_grammar::control_marker(&tokenizer, tool_format);
    let grammar = GrammarCompiler::new(tokenizer.clone()).map_err(|e| e.to_string());
    if let Err(e) = &grammar {
        eprintln!("edgelm: warning: constrained decoding is unavailable: {e}");
    }
    if let Err(e) = &template {
        eprintln!(
            "edgelm: warning: the chat template is unusable, /v1/chat/completions will fail: {e}"
        );
    }
    let sched = Scheduler::new(
        engine,
        SchedulerConfig {
            n_ctx: args.ctx,
            max_running: args.parallel,
            // The engine thread enforces the queue (see `Limits`); this only bounds the
            // scheduler's own list.
            max_waiting: args.parallel.saturating_add(args.queue),
            step_tokens: STEP_TOKENS,
            kv_budget: args.kv_budget,
            prefix_cache: true,
            context_shift: args.context_shift.then_some(args.keep),
        },
    )
    .context("setting up the scheduler (check --parallel, --ctx and --kv-budget)")?;
    let n_ctx = sched.n_ctx();
    let kv = sched.kv_stats();
    eprintln!(
        "edgelm: serving {model}: {} running at most, {} waiting, {n_ctx} positions per \
         sequence, KV cache of {} positions",
        args.parallel, args.queue, kv.capacity
    );
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let limits = Limits {
        parallel: args.parallel,
        queue: args.queue,
    };
    let engine_metrics = metrics.clone();
    let engine_thread = std::thread::Builder::new()
        .name("edgelm-engine".into())
        .spawn(move || engine_thread::run(sched, rx, limits, engine_metrics))
        .context("starting the engine thread")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let app = Arc::new(App {
        openapi: openapi::document(&model, n_ctx, args.api_key.is_some()),
        model,
        aliases,
        created: now.as_secs(),
        api_key: args.api_key.clone(),
        tokenizer,
        template,
        tool_format,
        tool_marker,
        grammar,
        n_ctx,
        context_shift: args.context_shift,
        parallel: args.parallel,
        engine: tx,
        session_dir: args.session_dir.clone(),
        metrics,
        salt: now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32),
        counter: AtomicU64::new(0),
    });
    // One thread: HTTP work is light, and the cores belong to compute.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(listen(app, &args.host, args.port));
    // Dropping the runtime drops every handle to the engine's channel; the engine thread then
    // finishes what it holds and returns.
    drop(rt);
    if engine_thread.join().is_err() {
        bail!("the engine thread panicked (see the message above)");
    }
    served
}

async fn listen(app: Arc<App>, host: &str, port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening on {host}:{port} (is the port taken? try --port)"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    eprintln!("edgelm: listening on http://{addr}");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    eprintln!("edgelm: stopped");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    eprintln!("edgelm: shutting down: finishing requests in flight (signal again to stop now)");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("edgelm: stopping now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(chat_page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embed))
        .route("/v1/sessions/{name}", post(session))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .layer(middleware::from_fn_with_state(app.clone(), count_response))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut res = Response::new(Body::from(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Label values of `edgelm_requests_total`: the served paths, everything else "other".
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/health" => "/health",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/metrics" => "/metrics",
        "/openapi.json" => "/openapi.json",
        p if p.starts_with("/v1/models/") => "/v1/models/{model}",
        p if p.starts_with("/v1/sessions/") => "/v1/sessions/{name}",
        _ => "other",
    }
}

async fn count_response(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let res = next.run(req).await;
    app.metrics.count(endpoint, res.status().as_u16());
    res
}

/// Byte comparison whose time does not depend on where the first difference is.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn authorize(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    // The chat page holds no data and asks for the key itself; /health is for probes.
    if matches!(req.uri().path(), "/" | "/health") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => ApiError::unauthorized(
            "no API key given: send the header `Authorization: Bearer <key>` with the key this \
             server was started with (--api-key)",
        )
        .into_response(),
        Some(k) if !same_key(k.as_bytes(), key.as_bytes()) => ApiError::unauthorized(
            "the API key is not the one this server was started with (--api-key); check it",
        )
        .into_response(),
        Some(_) => next.run(req).await,
    }
}

async fn chat_page() -> Response {
    let mut res = Response::new(Body::from(CHAT_PAGE));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Everything the page needs is inline; it may only talk to this server.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn models(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [app.model_object()]}),
    )
}

async fn model(State(app): State<Arc<App>>, uri: Uri) -> Result<Response, ApiError> {
    let name = uri.path().trim_start_matches("/v1/models/");
    app.check_model(Some(name))?;
    Ok(json_response(StatusCode::OK, &app.model_object()))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let mut res = Response::new(Body::from(app.metrics.render()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn openapi_json(State(app): State<Arc<App>>) -> Response {
    json_response(StatusCode::OK, &app.openapi)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "there is no route {}; see /openapi.json for the routes served",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

async fn chat(State(app): State<Arc<App>>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let p = api::parse_chat(&body)?;
    generate(app, p).await
}

async fn completions(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let p = api::parse_completion(&body)?;
    generate(app, p).await
}

/// Embed each input as its own engine request. At most `--parallel` inputs are in the engine
/// at once, the next submitted as the oldest finishes, so a long list neither fills the queue
/// nor stops other clients' requests from getting a place.
/// `POST /v1/sessions/{name}?action=save|restore`: save the KV state of a conversation (its
/// cached prefix: body `{"messages": […], "tools"?: […]}` or `{"prompt": "…"}`) to
/// `--session-dir/{name}.kv`, or restore such a file into the prefix cache, so a later request
/// starting with that conversation is not recomputed.
async fn session(
    State(app): State<Arc<App>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let dir = app.session_dir.as_ref().ok_or_else(|| {
        ApiError::not_found("sessions are off; start edgelm serve with --session-dir DIR")
    })?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ApiError::field(
            "name",
            "a session name is 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
        ));
    }
    let action = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("action="));
    let path = dir.join(format!("{name}.kv"));
    let action = match action {
        Some("restore") => {
            if !path.exists() {
                return Err(ApiError::not_found(format!("there is no session {name:?}")));
            }
            SessionAction::Restore
        }
        Some("save") => {
            let body = error::parse_object(&body)?;
            let tokens = match (body.get("messages"), body.get("prompt")) {
                (Some(_), _) => {
                    let Prompt::Chat { messages, tools } = api::parse_chat(&body)?.prompt else {
                        return Err(ApiError::internal("a chat body parsed as another prompt"));
                    };
                    app.encode_chat(&messages, tools.as_deref())?
                }
                (None, Some(Value::String(text))) => app
                    .tokenizer
                    .encode(text, Encode::PROMPT)
                    .map_err(|e| ApiError::field("prompt", format!("tokenizing failed: {e}")))?,
                _ => {
                    return Err(ApiError::field(
                        "messages",
                        "give the conversation to save as `messages` (or a `prompt` string)",
                    ))
                }
            };
            SessionAction::Save(tokens)
        }
        _ => {
            return Err(ApiError::field(
                "action",
                "add ?action=save or ?action=restore to the URL",
            ))
        }
    };
    let saving = matches!(action, SessionAction::Save(_));
    let (reply, done) = oneshot::channel();
    let stopped = || ApiError::unavailable("the engine is not running (the server is stopping)");
    app.engine
        .send(Job::Session(SessionJob {
            action,
            path,
            reply,
        }))
        .map_err(|_| stopped())?;
    let tokens = done.await.map_err(|_| stopped())?.map_err(|e| match e {
        edgelm_engine::SessionError::Io { .. } => ApiError::internal(e.to_string()),
        // A file that is damaged or of another model, KV type or shape: the client named it.
        other => ApiError::field("name", other.to_string()),
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"name": name, "action": if saving { "save" } else { "restore" },
                "tokens": tokens}),
    ))
}

async fn embed(
    State(app): State<Arc<App>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let p = embeddings::parse(&body)?;
    app.check_model(p.model.as_deref())?;
    let prompts = p
        .inputs
        .into_iter()
        .map(|input| match input {
            embeddings::Input::Text(text) => app
                .tokenizer
                .encode(&text, Encode::PROMPT)
                .map_err(|e| ApiError::field("input", format!("tokenizing the input failed: {e}"))),
            embeddings::Input::Tokens(ids) => Ok(ids),
        })
        .collect::<Result<Vec<_>, _>>()?;
    embeddings::check_lengths(&prompts, app.n_ctx)?;
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let mut vectors = Vec::with_capacity(prompts.len());
    let mut prompts = prompts.into_iter();
    let mut pending = VecDeque::new();
    loop {
        while pending.len() < app.parallel {
            let Some(prompt) = prompts.next() else { break };
            pending.push_back(submit(&app, Request::embedding(prompt), arrived, "input").await?);
        }
        let Some(mut rx) = pending.pop_front() else {
            break;
        };
        let mut vector = None;
        loop {
            match rx.recv().await {
                Some(Event::Embedding(v)) => vector = Some(v),
                Some(Event::Done { .. }) => break,
                Some(Event::Error(msg)) => {
                    return Err(ApiError::internal(format!("embedding failed: {msg}")))
                }
                Some(_) => {}
                None => {
                    return Err(ApiError::unavailable(
                        "the engine stopped before the embedding was computed",
                    ))
                }
            }
        }
        vectors.push(vector.ok_or_else(|| {
            ApiError::internal("the engine finished an embedding request without its vector")
        })?);
    }
    let text = embeddings::response(&app.model, &vectors, p.encoding, prompt_tokens);
    let mut res = Response::new(Body::from(text));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// Hand `request` to the engine thread; its events, once the scheduler accepted it.
async fn submit(
    app: &App,
    request: Request,
    arrived: Instant,
    prompt_param: &str,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (events, rx) = mpsc::unbounded_channel();
    let (reply, accepted) = oneshot::channel();
    let stopped = || ApiError::unavailable("the engine is not running (the server is stopping)");
    app.engine
        .send(Job::Generate(Box::new(Submission {
            request,
            events,
            arrived,
            reply,
        })))
        .map_err(|_| stopped())?;
    accepted
        .await
        .map_err(|_| stopped())?
        .map_err(|e| ApiError::from_submit(e, prompt_param))?;
    Ok(rx)
}

/// Tokenize, submit, and answer with a stream or, once every choice is done, one object.
async fn generate(app: Arc<App>, p: Params) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    app.check_model(p.model.as_deref())?;
    let shaping = shaping::shaping(&p, &app.grammar, app.tool_format, app.tool_marker)?;
    let tokens = match &p.prompt {
        Prompt::Chat { messages, tools } => app.encode_chat(messages, tools.as_deref())?,
        Prompt::Text(text) => app
            .tokenizer
            .encode(text, Encode::PROMPT)
            .map_err(|e| ApiError::field("prompt", format!("tokenizing the prompt failed: {e}")))?,
        Prompt::Tokens(ids) => ids.clone(),
    };
    let echo = match (&p.prompt, p.echo) {
        (_, false) => None,
        (Prompt::Text(text), true) => Some(Echo {
            text: text.clone(),
            tokens: tokens.clone(),
        }),
        (_, true) => Some(Echo {
            text: app
                .tokenizer
                .decode(&tokens)
                .map_err(|e| ApiError::field("prompt", format!("the prompt's token ids: {e}")))?,
            tokens: tokens.clone(),
        }),
    };
    // Asked for more than the context holds: refused, not cut short in silence (OpenAI's rule),
    // unless the context shifts to make room.
    if let Some(m) = p.max_tokens.filter(|_| !app.context_shift) {
        // (A prompt alone too long is the scheduler's refusal, naming the prompt.)
        if tokens.len() < app.n_ctx && tokens.len().saturating_add(m) > app.n_ctx {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "this model's maximum context length is {} tokens, but {} were requested \
                     ({} in the prompt, {m} for the completion); lower max_tokens, shorten the \
                     prompt, or raise the server's --ctx",
                    app.n_ctx,
                    tokens.len() + m,
                    tokens.len()
                ),
            )
            .code("context_length_exceeded"));
        }
    }
    let max_tokens = p.max_tokens.unwrap_or(match p.kind {
        // Chat runs to the end of the answer or of the context, as OpenAI's does.
        Kind::Chat => app.n_ctx,
        Kind::Completion => 16,
    });
    let mut sampling = p.sampling.clone();
    sampling.seed = p.seed.unwrap_or_else(|| app.random());
    let mut request = Request::new(tokens, max_tokens, sampling);
    request.stop = p.stop.clone();
    request.ignore_eos = p.ignore_eos;
    request.n = p.n;
    request.logprobs = p.logprobs;
    request.prompt_logprobs = echo.is_some() && p.logprobs.is_some();
    request.logit_bias = p.logit_bias.clone();
    request.guide = shaping.guide;

    let mut rx = submit(&app, request, arrived, p.kind.prompt_param()).await?;

    let prefix = match p.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let reply = Reply {
        kind: p.kind,
        id: format!("{prefix}-{:016x}", app.random()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        model: app.model.clone(),
        n: p.n,
        logprobs: p.logprobs.is_some(),
        echo,
        include_usage: p.stream && p.include_usage,
        tools: shaping.tools,
    };
    let vocab: Arc<dyn response::Vocab> = app.tokenizer.clone();
    if p.stream {
        let body = SseBody::new(rx, Assembler::new(reply, vocab, true));
        let mut res = Response::new(Body::new(body));
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(res);
    }
    let mut asm = Assembler::new(reply, vocab, false);
    let mut unused = VecDeque::new();
    loop {
        match rx.recv().await {
            Some(ev) => {
                if asm.on_event(ev, &mut unused)? {
                    break;
                }
            }
            None => return Err(asm.on_closed(&mut unused)),
        }
    }
    Ok(json_response(StatusCode::OK, &asm.response()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64 kb"), Ok(64 << 10));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("2X").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn served_names() {
        assert_eq!(
            served_name("qwen2.5-coder-0.5b-instruct"),
            "qwen2.5-coder-0.5b-instruct"
        );
        assert_eq!(served_name("/models/tiny-q8_0.gguf"), "tiny-q8_0");
        assert_eq!(served_name("tiny.GGUF"), "tiny");
    }

    #[test]
    fn endpoint_labels_stay_few() {
        assert_eq!(endpoint_label("/v1/completions"), "/v1/completions");
        assert_eq!(endpoint_label("/v1/models/x"), "/v1/models/{model}");
        assert_eq!(endpoint_label("/wp-admin"), "other");
        assert_eq!(endpoint_label("/"), "/");
        for (_, path) in openapi::ROUTES {
            assert_ne!(
                endpoint_label(&path.replace("{model}", "m").replace("{name}", "s")),
                "other",
                "{path}"
            );
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"abc", b"abc"));
        assert!(!same_key(b"abd", b"abc"));
        assert!(!same_key(b"ab", b"abc"));
    }
}
