//! `supportlm adapter`: inspect LoRA adapters and export a base model with an adapter merged in.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use supportlm_model::export::export_hf_dir;
use supportlm_model::lora::Adapter;
use supportlm_model::model::Checkpoint;
use supportlm_model::Model;

use crate::shared::DEFAULT_MODEL;

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Merge an adapter into its base and write a Hugging Face folder (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json).
    Merge(MergeArgs),
    /// Check an adapter against a base model and print its configuration and size.
    Info(InfoArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model: a .gguf file or a Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The adapter folder (PEFT format).
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder for the merged model.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
}

pub fn run(cmd: AdapterCommand) -> anyhow::Result<()> {
    match cmd {
        AdapterCommand::Merge(args) => {
            let model = Model::load(&args.model, &crate::shared::device()?)
                .with_context(|| format!("loading the base model from {}", args.model.display()))?
                .load_adapter(&args.adapter)
                .with_context(|| format!("applying the adapter in {}", args.adapter.display()))?;
            export_hf_dir(&model, &args.out)
                .with_context(|| format!("writing the merged model to {}", args.out.display()))?;
            println!("merged model written to {}", args.out.display());
            Ok(())
        }
        AdapterCommand::Info(args) => {
            let ck = Checkpoint::open(&args.model)
                .with_context(|| format!("opening {}", args.model.display()))?;
            let adapter = Adapter::load(&args.adapter, &ck.config)
                .with_context(|| format!("reading the adapter in {}", args.adapter.display()))?;
            let c = &adapter.config;
            let base = ck.config.num_params();
            println!("adapter: {}", args.adapter.display());
            println!("base_model_name_or_path: {}", adapter.base_model);
            println!(
                "r: {}, alpha: {}, scale: {}, dropout: {}, rslora: {}",
                c.r,
                c.alpha,
                c.scale(),
                c.dropout,
                c.use_rslora
            );
            let targets: Vec<&str> = c.targets.iter().map(|t| t.as_str()).collect();
            println!("targets: {}", targets.join(" "));
            match &c.layers {
                Some(l) => println!("layers: {l:?}"),
                None => println!("layers: all {}", ck.config.num_hidden_layers),
            }
            let n = adapter.num_params();
            println!(
                "trainable parameters: {n} = {:.3}% of the base's {base}",
                100.0 * n as f64 / base as f64
            );
            Ok(())
        }
    }
}
