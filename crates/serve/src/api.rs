//! The HTTP surface: the study's demo API (`/api/…`), OpenAI-compatible endpoints (`/v1/…`), llama.cpp's
//! `/health`, and the page at `/`. Handlers only parse, queue a job on the [`Engine`] and shape the
//! answer; errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) everywhere.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use supportlm_data::robustness::OUT_OF_SCOPE;
use supportlm_data::{Category, Task};
use supportlm_model::sampling::SamplingConfig;
use supportlm_model::BaseQuant;
use supportlm_prompting::guard::{fallback_reply, neutralise, scope_reply, Guard};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{ChatMessage, ClassifyJob, Engine, Finish, GenEvent, GenerateJob, Job, Prompt};
use crate::error::ServeError;

/// The page, embedded in the binary (no external resources).
const PAGE: &str = include_str!("page.html");

/// What the handlers share.
pub struct AppState {
    /// The model thread.
    pub engine: Engine,
    /// The base's id.
    pub base_id: String,
    /// How the base's linear weights are held.
    pub base_quant: BaseQuant,
    /// With `--guard`: each classifier's off-topic threshold (`None`: the base, 0-shot).
    pub guards: Option<BTreeMap<Option<String>, Guard>>,
    /// What a reply must not contain (checked when the guard is on).
    pub leak_markers: Vec<String>,
    /// Attached adapters, by name.
    pub adapters: Vec<String>,
    /// The adapter `/api/process` classifies with (`None`: the base, 0-shot).
    pub classify_adapter: Option<String>,
    /// The adapter `/api/process` and `/api/generate` write replies with (`None`: the base).
    pub respond_adapter: Option<String>,
    /// The bearer key requests must carry, if any.
    pub api_key: Option<String>,
    /// Per-request time limit.
    pub timeout: Duration,
    /// The body limit (for the 413 message).
    pub max_body_bytes: usize,
    /// When the server started.
    pub started: Instant,
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {
            "message": self.to_string(), "type": self.kind(), "param": Value::Null,
            "code": status.as_u16(),
        }});
        let mut response = (status, Json(body)).into_response();
        if matches!(self, ServeError::QueueFull) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health_plain))
        .route("/api/health", get(health))
        .route("/api/classify", post(classify))
        .route("/api/generate", post(generate))
        .route("/api/process", post(process))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ServeError::BadRequest("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Every route but the page needs the bearer key when one is configured.
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let open = request.uri().path() == "/";
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !open && given != Some(key.as_str()) {
            return ServeError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// A JSON body, or the 400/413 naming what is wrong with it.
fn body<T>(state: &AppState, parsed: Result<Json<T>, JsonRejection>) -> Result<T, ServeError> {
    match parsed {
        Ok(Json(v)) => Ok(v),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ServeError::TooLarge(state.max_body_bytes))
        }
        Err(r) => Err(ServeError::BadRequest(r.body_text())),
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), ServeError> {
    if value.trim().is_empty() {
        return Err(ServeError::BadRequest(format!("`{field}` is empty")));
    }
    Ok(())
}

async fn health_plain() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": state.base_id,
        "base_quant": state.base_quant,
        "adapters": state.adapters,
        "classify_adapter": state.classify_adapter,
        "respond_adapter": state.respond_adapter,
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "queue_depth": state.engine.queue_depth(),
    }))
}

/// Waits for `rx` within the request's time limit.
async fn within<T>(
    state: &AppState,
    rx: oneshot::Receiver<Result<T, ServeError>>,
) -> Result<T, ServeError> {
    match tokio::time::timeout(state.timeout, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ServeError::Internal(
            "the model thread dropped a request".into(),
        )),
        Err(_) => Err(ServeError::Timeout(state.timeout.as_secs())),
    }
}

fn known_adapter(state: &AppState, adapter: Option<&str>) -> Result<(), ServeError> {
    match adapter {
        Some(a) if a != state.base_id && !state.adapters.iter().any(|n| n == a) => {
            Err(ServeError::UnknownModel(a.to_string()))
        }
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    message: String,
    adapter: Option<String>,
    task: Option<String>,
}

/// Queues a classification and waits for its label distribution.
async fn run_classify(
    state: &AppState,
    message: String,
    adapter: Option<String>,
    task: Task,
) -> Result<Vec<(&'static str, f64)>, ServeError> {
    known_adapter(state, adapter.as_deref())?;
    let (reply, rx) = oneshot::channel();
    state.engine.submit(Job::Classify(ClassifyJob {
        message,
        adapter,
        task,
        reply,
    }))?;
    within(state, rx).await
}

/// The message as the model will see it: neutralised when the guard is on.
fn screen(state: &AppState, message: String) -> String {
    if state.guards.is_some() {
        neutralise(&message).0
    } else {
        message
    }
}

/// Whether the guard calls a category classification by `adapter` off-topic.
fn off_topic(state: &AppState, adapter: &Option<String>, confidence: f64) -> bool {
    let key = adapter.clone().filter(|a| *a != state.base_id);
    state
        .guards
        .as_ref()
        .and_then(|g| g.get(&key))
        .is_some_and(|g: &Guard| g.off_topic(confidence))
}

/// The reply, or the fallback when the guard is on and the reply is degenerate; and whether it was
/// replaced.
fn checked_reply(state: &AppState, text: String) -> (String, bool) {
    if state.guards.is_none() {
        return (text, false);
    }
    let markers: Vec<&str> = state.leak_markers.iter().map(String::as_str).collect();
    if supportlm_metrics::degeneration::check(&text, &markers).any() {
        (fallback_reply().to_string(), true)
    } else {
        (text, false)
    }
}

fn best(scores: &[(&'static str, f64)]) -> (&'static str, f64) {
    scores.iter().copied().fold(
        ("", f64::NEG_INFINITY),
        |b, s| if s.1 > b.1 { s } else { b },
    )
}

async fn classify(
    State(state): State<Arc<AppState>>,
    parsed: Result<Json<ClassifyRequest>, JsonRejection>,
) -> Result<Json<Value>, ServeError> {
    let started = Instant::now();
    let req = body(&state, parsed)?;
    non_empty("message", &req.message)?;
    let task = match req.task.as_deref() {
        None | Some("category") => Task::Category,
        Some("intent") => Task::Intent,
        Some(other) => {
            return Err(ServeError::BadRequest(format!(
                "`task` must be \"category\" or \"intent\", not {other:?}"
            )))
        }
    };
    let message = screen(&state, req.message);
    let scores = run_classify(&state, message, req.adapter.clone(), task).await?;
    let (label, confidence) = best(&scores);
    let map: BTreeMap<&str, f64> = scores.iter().copied().collect();
    if task == Task::Category && off_topic(&state, &req.adapter, confidence) {
        return Ok(Json(json!({
            "label": OUT_OF_SCOPE, "confidence": confidence, "scores": map,
            "guard": "off-topic", "reply": scope_reply(),
            "latency_ms": started.elapsed().as_secs_f64() * 1e3,
        })));
    }
    Ok(Json(json!({
        "label": label, "confidence": confidence, "scores": map,
        "latency_ms": started.elapsed().as_secs_f64() * 1e3,
    })))
}

/// Queues a generation; returns its event stream.
fn start_generation(
    state: &AppState,
    prompt: Prompt,
    adapter: Option<String>,
    max_tokens: usize,
    sampling: SamplingConfig,
    stop: Vec<String>,
) -> Result<mpsc::UnboundedReceiver<GenEvent>, ServeError> {
    known_adapter(state, adapter.as_deref())?;
    let (events, rx) = mpsc::unbounded_channel();
    state.engine.submit(Job::Generate(GenerateJob {
        prompt,
        adapter,
        max_tokens,
        sampling,
        stop,
        events,
    }))?;
    Ok(rx)
}

/// A finished generation.
struct Completed {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish: Finish,
}

/// Reads a generation's events to the end, within the time limit.
async fn collect(
    state: &AppState,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<Completed, ServeError> {
    let deadline = tokio::time::Instant::now() + state.timeout;
    let mut out = Completed {
        text: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        finish: Finish::Stop,
    };
    loop {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| ServeError::Timeout(state.timeout.as_secs()))?;
        match event {
            Some(GenEvent::Started { prompt_tokens }) => out.prompt_tokens = prompt_tokens,
            Some(GenEvent::Text(t)) => out.text += &t,
            Some(GenEvent::Done {
                completion_tokens,
                finish,
            }) => {
                out.completion_tokens = completion_tokens;
                out.finish = finish;
                return Ok(out);
            }
            Some(GenEvent::Failed(e)) => return Err(e),
            None => {
                return Err(ServeError::Internal(
                    "the model thread dropped a request".into(),
                ))
            }
        }
    }
}

/// The first event of a stream, so that a request the worker refuses is an HTTP error, not a stream.
async fn first_event(
    state: &AppState,
    rx: &mut mpsc::UnboundedReceiver<GenEvent>,
) -> Result<usize, ServeError> {
    match tokio::time::timeout(state.timeout, rx.recv()).await {
        Err(_) => Err(ServeError::Timeout(state.timeout.as_secs())),
        Ok(Some(GenEvent::Started { prompt_tokens })) => Ok(prompt_tokens),
        Ok(Some(GenEvent::Failed(e))) => Err(e),
        Ok(_) => Err(ServeError::Internal("a generation did not start".into())),
    }
}

/// The remaining events as a stream of `to_event` results, ended at `Done`/`Failed` or the deadline.
fn event_stream<F>(
    state: &AppState,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    to_event: F,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnMut(GenEvent) -> Vec<Event> + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + state.timeout;
    let timeout_s = state.timeout.as_secs();
    stream::unfold(
        (rx, to_event, false),
        move |(mut rx, mut to_event, finished)| async move {
            if finished {
                return None;
            }
            let (events, end) = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e @ (GenEvent::Done { .. } | GenEvent::Failed(_)))) => (to_event(e), true),
                Ok(Some(e)) => (to_event(e), false),
                Ok(None) => (Vec::new(), true),
                Err(_) => (
                    to_event(GenEvent::Failed(ServeError::Timeout(timeout_s))),
                    true,
                ),
            };
            Some((
                stream::iter(events.into_iter().map(Ok)),
                (rx, to_event, end),
            ))
        },
    )
    .flatten()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    message: String,
    category: Option<String>,
    adapter: Option<String>,
    max_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
}

fn parse_category(c: &str) -> Result<Category, ServeError> {
    c.parse().map_err(|_| {
        ServeError::BadRequest(format!(
            "`category` {c:?} is not one of {}",
            Task::Category.labels().join(", ")
        ))
    })
}

const DEFAULT_REPLY_TOKENS: usize = 160;

async fn generate(
    State(state): State<Arc<AppState>>,
    parsed: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ServeError> {
    let started = Instant::now();
    let req = body(&state, parsed)?;
    non_empty("message", &req.message)?;
    let message = screen(&state, req.message.clone());
    let category = match &req.category {
        Some(c) => parse_category(c)?,
        // Without a category the reply is conditioned on the predicted one.
        None => {
            let scores = run_classify(
                &state,
                message.clone(),
                state.classify_adapter.clone(),
                Task::Category,
            )
            .await?;
            parse_category(best(&scores).0)?
        }
    };
    let adapter = req.adapter.or_else(|| state.respond_adapter.clone());
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_REPLY_TOKENS);
    let mut rx = start_generation(
        &state,
        Prompt::Respond { message, category },
        adapter,
        max_tokens,
        SamplingConfig::default(),
        Vec::new(),
    )?;
    if req.stream {
        first_event(&state, &mut rx).await?;
        let stream = event_stream(&state, rx, move |e| {
            match e {
            GenEvent::Text(t) => vec![Event::default().data(json!({"token": t}).to_string())],
            GenEvent::Done {
                completion_tokens, ..
            } => vec![Event::default().event("done").data(
                json!({"tokens": completion_tokens, "latency_ms": started.elapsed().as_secs_f64() * 1e3})
                    .to_string(),
            )],
            GenEvent::Failed(e) => vec![Event::default()
                .event("error")
                .data(json!({"error": e.to_string()}).to_string())],
            GenEvent::Started { .. } => Vec::new(),
        }
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let done = collect(&state, rx).await?;
    let (response, replaced) = checked_reply(&state, done.text);
    let mut out = json!({
        "response": response, "category": category.as_str(), "tokens": done.completion_tokens,
        "latency_ms": started.elapsed().as_secs_f64() * 1e3,
    });
    if replaced {
        out["guard"] = json!("fallback");
    }
    Ok(Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessRequest {
    message: String,
    max_tokens: Option<usize>,
}

async fn process(
    State(state): State<Arc<AppState>>,
    parsed: Result<Json<ProcessRequest>, JsonRejection>,
) -> Result<Json<Value>, ServeError> {
    let started = Instant::now();
    let req = body(&state, parsed)?;
    non_empty("message", &req.message)?;
    let message = screen(&state, req.message);
    let scores = run_classify(
        &state,
        message.clone(),
        state.classify_adapter.clone(),
        Task::Category,
    )
    .await?;
    let (label, confidence) = best(&scores);
    if off_topic(&state, &state.classify_adapter, confidence) {
        return Ok(Json(json!({
            "label": OUT_OF_SCOPE, "confidence": confidence, "response": scope_reply(), "tokens": 0,
            "guard": "off-topic", "latency_ms": started.elapsed().as_secs_f64() * 1e3,
        })));
    }
    let rx = start_generation(
        &state,
        Prompt::Respond {
            message,
            category: parse_category(label)?,
        },
        state.respond_adapter.clone(),
        req.max_tokens.unwrap_or(DEFAULT_REPLY_TOKENS),
        SamplingConfig::default(),
        Vec::new(),
    )?;
    let done = collect(&state, rx).await?;
    let (response, replaced) = checked_reply(&state, done.text);
    let mut out = json!({
        "label": label, "confidence": confidence, "response": response,
        "tokens": done.completion_tokens,
        "latency_ms": started.elapsed().as_secs_f64() * 1e3,
    });
    if replaced {
        out["guard"] = json!("fallback");
    }
    Ok(Json(out))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let created = unix_now();
    let data: Vec<Value> = std::iter::once(&state.base_id)
        .chain(&state.adapters)
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "supportlm"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `stop` is a string or a list of strings in OpenAI's API.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI's chat request; fields this server does not use (`n` above 1 aside) are accepted and
/// ignored, as clients send them by default.
#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    parsed: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ServeError> {
    let req = body(&state, parsed)?;
    if req.messages.is_empty() {
        return Err(ServeError::BadRequest("`messages` is empty".into()));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ServeError::BadRequest("`n` must be 1".into()));
    }
    if let Some(t) = req.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(ServeError::BadRequest(format!(
            "`temperature` {t} is outside [0, 2]"
        )));
    }
    if let Some(p) = req.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ServeError::BadRequest(format!(
            "`top_p` {p} is outside (0, 1]"
        )));
    }
    let adapter = (req.model != state.base_id).then(|| req.model.clone());
    let sampling = SamplingConfig {
        temperature: req.temperature.unwrap_or(0.0),
        top_p: req.top_p,
        seed: req.seed.unwrap_or(0),
        ..Default::default()
    };
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256);
    let messages = req
        .messages
        .into_iter()
        .map(|m| ChatMessage {
            content: screen(&state, m.content),
            ..m
        })
        .collect();
    let mut rx = start_generation(
        &state,
        Prompt::Chat(messages),
        adapter,
        max_tokens,
        sampling,
        stop,
    )?;
    let id = format!("chatcmpl-{:x}", unix_now() ^ (rand_bits() << 20));
    let created = unix_now();
    let model = req.model;
    if req.stream {
        let prompt_tokens = first_event(&state, &mut rx).await?;
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |delta: Value, finish: Option<Finish>| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let first = Event::default()
            .data(chunk(json!({"role": "assistant", "content": ""}), None).to_string());
        let rest = event_stream(&state, rx, move |e| match e {
            GenEvent::Text(t) => {
                vec![Event::default().data(chunk(json!({"content": t}), None).to_string())]
            }
            GenEvent::Done {
                completion_tokens,
                finish,
            } => {
                let mut out =
                    vec![Event::default().data(chunk(json!({}), Some(finish)).to_string())];
                if include_usage {
                    let mut usage = chunk(json!({}), None);
                    usage["choices"] = json!([]);
                    usage["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens});
                    out.push(Event::default().data(usage.to_string()));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            GenEvent::Failed(e) => vec![
                Event::default().data(
                    json!({"error": {"message": e.to_string(), "type": e.kind()}}).to_string(),
                ),
                Event::default().data("[DONE]"),
            ],
            GenEvent::Started { .. } => Vec::new(),
        });
        let stream = stream::once(async move { Ok(first) }).chain(rest);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let done = collect(&state, rx).await?;
    let (content, _) = checked_reply(&state, done.text);
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": done.finish}],
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                  "total_tokens": done.prompt_tokens + done.completion_tokens},
    }))
    .into_response())
}

/// A few bits that differ between completions (ids only; nothing depends on them).
fn rand_bits() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
