//! `supportlm generate`: text in, text out (streamed to stdout; logs go to stderr).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use supportlm_model::generate::{generate, GenerateOptions};
use supportlm_model::sampling::SamplingConfig;
use supportlm_model::Model;

use crate::shared::DEFAULT_MODEL;

#[derive(Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A LoRA adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors),
    /// merged into the model before generating.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template (and stop at the end of the turn).
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if it has one).
    #[arg(long)]
    system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p when sampling.
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let model = Model::load(&args.model, &crate::shared::device()?)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    tracing::info!(model = %args.model.display(), config = ?model.llama.config.model_type, "loaded");
    let model = match &args.adapter {
        Some(dir) => {
            let model = model
                .load_adapter(dir)
                .with_context(|| format!("applying the adapter in {}", dir.display()))?;
            tracing::info!(adapter = %dir.display(), "adapter merged");
            model
        }
        None => model,
    };
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": args.prompt}));
        model.encode_chat(&messages, true)?
    } else {
        model.tokenizer.encode(&args.prompt, true)?
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_strings: args.stop,
    };
    let start = std::time::Instant::now();
    let mut stdout = std::io::stdout().lock();
    let out = generate(
        &model,
        std::slice::from_ref(&prompt),
        &options,
        &mut |_, _, piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    writeln!(stdout)?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        prompt_tokens = prompt.len(),
        new_tokens = out[0].tokens.len(),
        stop = ?out[0].stop,
        tokens_per_s = format!("{:.1}", out[0].tokens.len() as f64 / secs),
        "done"
    );
    Ok(())
}
