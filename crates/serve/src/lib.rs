//! `supportlm serve`: one base model in memory, several LoRA adapters attached to it unmerged, and the
//! study's demo API, an OpenAI-compatible endpoint and a web page over them.
//!
//! - [`engine`]: the model thread behind a bounded queue, and how concurrent requests are batched;
//! - [`api`]: the routes (`/api/health|classify|generate|process`, `/v1/models`,
//!   `/v1/chat/completions` with server-sent events, `/health`, the page at `/`), their JSON and errors;
//! - [`error`]: what can go wrong and its HTTP status;
//! - this file: [`ServeConfig`], loading the models ([`load_models`]) and running the server
//!   ([`serve`]) until SIGINT/SIGTERM, after which in-flight requests finish.

pub mod api;
pub mod engine;
pub mod error;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use supportlm_data::Task;
use supportlm_model::lora::Adapter;
use supportlm_model::{BaseQuant, Device, Model};
use supportlm_prompting::guard::{neutralise, Guard};
use supportlm_prompting::robustness::GUARD_RECALL;
use supportlm_prompting::{label_probabilities, Method};

pub use engine::{Engine, Models};
pub use error::ServeError;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// How the base's linear weights are held: f32 (`none`), or int8 / NF4 with the codes QLoRA
    /// training uses (less memory; adapters trained on such a base then see the weights they were
    /// trained against).
    pub base_quant: BaseQuant,
    /// Where the model runs (`--device`; the CPU by default).
    pub device: Device,
    /// Adapters to attach, by the name requests use.
    pub adapters: Vec<(String, PathBuf)>,
    /// The adapter `/api/process` (and `/api/generate` without a category) classifies with; default:
    /// one named `classify`, else the base with the 0-shot prompt.
    pub classify_adapter: Option<String>,
    /// The adapter replies are written with; default: one named `respond`, else the base.
    pub respond_adapter: Option<String>,
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Requests must carry this bearer key.
    pub api_key: Option<String>,
    /// Jobs that may wait for the model thread (more: 503).
    pub max_queue: usize,
    /// Largest request body (more: 413).
    pub max_body_bytes: usize,
    /// Per-request time limit (more: 504).
    pub request_timeout: Duration,
    /// The guard: chat-template tokens and role tags in messages neutralised; category
    /// classifications whose best probability is at or below the classifier's threshold (chosen at
    /// start on the validation off-topic messages of `supportlm_data::robustness`) answered with the
    /// scope reply; degenerate replies (empty, looping, leaking the prompt) replaced by a fallback.
    pub guard: bool,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model or an adapter did not load.
    #[error(transparent)]
    Model(#[from] supportlm_model::ModelError),
    /// A setting is wrong (names the flag).
    #[error("{0}")]
    Config(String),
    /// The address could not be bound, or the server failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loads the base once and attaches every adapter to it (their factors are the only per-adapter
/// memory).
pub fn load_models(config: &ServeConfig) -> Result<Models, StartError> {
    let base = Model::load_as(&config.model, config.base_quant, &config.device)?;
    let base_id = config
        .model
        .file_name()
        .map_or_else(|| "base".to_string(), |n| n.to_string_lossy().into_owned());
    let mut adapters = BTreeMap::new();
    for (name, dir) in &config.adapters {
        if name.is_empty() || *name == base_id || adapters.contains_key(name) {
            return Err(StartError::Config(format!(
                "--adapter {name}={}: the name must be non-empty, unique and differ from the base's id `{base_id}`",
                dir.display()
            )));
        }
        let adapter = Adapter::load(dir, &base.llama.config)?;
        adapters.insert(name.clone(), base.attach_adapter(adapter)?);
    }
    for (flag, name) in [
        ("--classify-adapter", &config.classify_adapter),
        ("--respond-adapter", &config.respond_adapter),
    ] {
        if let Some(n) = name.as_ref().filter(|n| !adapters.contains_key(*n)) {
            return Err(StartError::Config(format!(
                "{flag} {n}: no adapter of that name (give it with --adapter {n}=DIR)"
            )));
        }
    }
    let guards = if config.guard {
        let mut guards = BTreeMap::new();
        guards.insert(None, fit_guard(&base, Method::ZeroShot)?);
        for (name, model) in &adapters {
            guards.insert(Some(name.clone()), fit_guard(model, Method::Sft)?);
        }
        for (name, g) in &guards {
            tracing::info!(
                classifier = name.as_deref().unwrap_or("base, 0-shot"),
                threshold = g.threshold,
                "guard: off-topic threshold"
            );
        }
        Some(guards)
    } else {
        None
    };
    let leak_markers = supportlm_prompting::respond::leak_markers(&base);
    Ok(Models {
        base_id,
        base,
        adapters,
        guards,
        leak_markers,
    })
}

/// A classifier's off-topic threshold: the best label probability that flags 95% of the validation
/// off-topic messages (neutralised as requests are).
fn fit_guard(model: &Model, method: Method) -> Result<Guard, StartError> {
    let messages: Vec<String> = supportlm_data::robustness::off_topic_validation(GUARD_SEED)
        .into_iter()
        .map(|m| neutralise(m).0)
        .collect();
    let best: Vec<f64> = label_probabilities(model, &messages, Task::Category, method, &[])
        .map_err(|e| StartError::Config(format!("fitting the guard's threshold: {e}")))?
        .iter()
        .map(|d| d.iter().map(|s| s.1).fold(0.0, f64::max))
        .collect();
    Guard::fit(&best, GUARD_RECALL)
        .ok_or_else(|| StartError::Config("the guard has no validation messages".into()))
}

/// The seed of the robustness set whose validation off-topic half the guard is fitted on.
const GUARD_SEED: u64 = 42;

/// The state the routes share, and the model thread's handle.
pub fn app_state(
    config: &ServeConfig,
    models: Models,
) -> (Arc<api::AppState>, std::thread::JoinHandle<()>) {
    let pick = |given: &Option<String>, default: &str| {
        given.clone().or_else(|| {
            models
                .adapters
                .contains_key(default)
                .then(|| default.to_string())
        })
    };
    let classify_adapter = pick(&config.classify_adapter, "classify");
    let respond_adapter = pick(&config.respond_adapter, "respond");
    let base_id = models.base_id.clone();
    let base_quant = models.base.base_quant;
    let guards = models.guards.clone();
    let leak_markers = models.leak_markers.clone();
    let adapters = models.adapters.keys().cloned().collect();
    let (engine, worker) = Engine::start(models, config.max_queue);
    let state = Arc::new(api::AppState {
        engine,
        base_id,
        base_quant,
        adapters,
        guards,
        leak_markers,
        classify_adapter,
        respond_adapter,
        api_key: config.api_key.clone(),
        timeout: config.request_timeout,
        max_body_bytes: config.max_body_bytes,
        started: Instant::now(),
    });
    (state, worker)
}

/// Serves on a bound listener until `shutdown` resolves; in-flight requests finish, then the model
/// thread drains and stops.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<api::AppState>,
    worker: std::thread::JoinHandle<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let app = api::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // The router (and with it every engine handle) is gone: the model thread ends after its queue.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    Ok(())
}

/// Loads the models, binds `config.addr` and serves until SIGINT or SIGTERM.
pub fn serve(config: &ServeConfig) -> Result<(), StartError> {
    let models = load_models(config)?;
    let (state, worker) = app_state(config, models);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving; Ctrl-C stops after in-flight requests");
        serve_on(listener, state, worker, shutdown_signal()).await
    })
}

/// SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stopping: finishing in-flight requests");
}
