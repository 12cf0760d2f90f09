//! `supportlm serve`: flags → [`supportlm_serve::ServeConfig`]; the server lives in the serve crate.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use supportlm_model::BaseQuant;
use supportlm_serve::ServeConfig;

use crate::shared::DEFAULT_MODEL;

#[derive(Args)]
pub struct ServeArgs {
    /// Base model: a .gguf file or a Hugging Face folder (loaded once).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// How the base's linear weights are held: none (f32), int8 or nf4 (the codes QLoRA trains
    /// against; less memory).
    #[arg(long, default_value = "none")]
    base_quant: BaseQuant,
    /// An adapter (PEFT folder) attached to the base under NAME, chosen per request (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The adapter `/api/process` classifies with (default: one named `classify`, else 0-shot).
    #[arg(long)]
    classify_adapter: Option<String>,
    /// The adapter replies are written with (default: one named `respond`, else the base).
    #[arg(long)]
    respond_adapter: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <key>` with the key read from this environment variable.
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// Requests that may wait for the model (more get 503 with Retry-After).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes (more get 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Seconds a request may take (more get 504).
    #[arg(long, default_value_t = 120)]
    request_timeout_s: u64,
    /// The guard: chat-template tokens and role tags in messages neutralised, off-topic messages
    /// answered with a scope reply (threshold chosen at start per classifier), degenerate replies
    /// replaced by a fallback.
    #[arg(long)]
    guard: bool,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let adapters = args
        .adapters
        .iter()
        .map(|a| {
            let (name, dir) = a
                .split_once('=')
                .with_context(|| format!("--adapter {a}: expected NAME=DIR"))?;
            Ok((name.to_string(), PathBuf::from(dir)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api_key = match &args.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => bail!("--api-key-env {var}: the environment variable is not set or empty"),
        },
    };
    let config = ServeConfig {
        model: args.model,
        base_quant: args.base_quant,
        device: crate::shared::device()?,
        adapters,
        classify_adapter: args.classify_adapter,
        respond_adapter: args.respond_adapter,
        addr: SocketAddr::new(args.host, args.port),
        api_key,
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout_s.max(1)),
        guard: args.guard,
    };
    supportlm_serve::serve(&config).context("serving")?;
    Ok(())
}
