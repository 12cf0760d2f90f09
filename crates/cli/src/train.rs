//! `supportlm train`: LoRA / QLoRA fine-tuning from a config file, with a progress bar, Ctrl-C that
//! checkpoints before exiting, and `--resume`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use supportlm_data::{load_csv, shipped, split, SplitConfig, SplitSet};
use supportlm_model::chat::ChatTemplate;
use supportlm_model::model::Checkpoint;
use supportlm_train::qlora::{QloraModel, StepPath};
use supportlm_train::trainer::{train, TrainJob};
use supportlm_train::TrainConfig;

use crate::shared::DEFAULT_MODEL;

#[derive(Args)]
pub struct TrainArgs {
    /// A TOML config (see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set lr=2e-4 --set lora.r=16` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Base model: a .gguf file or a Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A split folder written by `supportlm data split` (default: split the shipped data for the
    /// config's task with the default seed, in memory).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder (checkpoints, metrics.jsonl, adapter/, best-adapter/).
    #[arg(long)]
    out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Only redraw loss.svg / loss.png of the run in --out from its metrics.jsonl.
    #[arg(long)]
    plot_only: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::load(args.config.as_deref(), &args.overrides)?;
    if args.plot_only {
        supportlm_train::trainer::plot_losses(
            &args.out,
            &format!("{} SFT, {} base", config.task, config.base_quant),
        )?;
        println!("wrote {}", args.out.join("loss.png").display());
        return Ok(());
    }
    let splits = match &args.data {
        Some(dir) => SplitSet::read(dir)
            .with_context(|| format!("reading the split in {}", dir.display()))?,
        None => {
            shipped::verify_if_shipped(&shipped::default_input())?;
            let dataset = load_csv(&shipped::default_input())?;
            split::split(
                &dataset,
                &SplitConfig {
                    task: config.task,
                    ..Default::default()
                },
            )?
        }
    };
    if splits.config.task != config.task {
        bail!(
            "the split in {:?} is for task {}, the config trains {}",
            args.data,
            splits.config.task,
            config.task
        );
    }
    let ck = Checkpoint::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let template = ChatTemplate::for_tokenizer(&ck.tokenizer)?;
    let device = crate::shared::device()?;
    let mut model =
        ck.with_source(|src| QloraModel::load(src, &ck.config, config.base_quant, &device))?;
    model.step_path = StepPath::choose(config.store_activations, model.device());
    let fp = model.footprint();
    tracing::info!(
        base_quant = %config.base_quant,
        base_mb = fp.total_bytes() as f64 / 1e6,
        bits_per_param = fp.bits_per_linear_param(),
        "base loaded"
    );
    std::fs::create_dir_all(&args.out)?;
    supportlm_data::fsio::write_atomic(&args.out.join("config.toml"), config.to_toml().as_bytes())?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(i32::from(crate::EXIT_INTERRUPTED));
            }
            eprintln!(
                "\nstopping after this step (checkpoint first); press Ctrl-C again to quit now"
            );
        })
        .context("installing the Ctrl-C handler")?;
    }
    let base_name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let job = TrainJob {
        model: &mut model,
        tokenizer: &ck.tokenizer,
        template: &template,
        train: &splits.train.records,
        validation: &splits.validation.records,
        config: &config,
        out_dir: &args.out,
        base_model: &base_name,
        resume: args.resume,
        stop: Some(&stop),
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut smoothed: Option<f64> = None;
    let mut last_val = None;
    let outcome = train(job, &mut |line, total| {
        bar.set_length(total as u64);
        bar.set_position(line.step as u64);
        if let Some(l) = line.train_loss {
            smoothed = Some(smoothed.map_or(l, |s| 0.9 * s + 0.1 * l));
        }
        if line.val_loss.is_some() {
            last_val = line.val_loss;
        }
        bar.set_message(format!(
            "loss {} val {} lr {:.2e} {:.0} tok/s",
            smoothed.map_or("-".into(), |s| format!("{s:.4}")),
            last_val.map_or("-".into(), |v: f64| format!("{v:.4}")),
            line.lr,
            line.tokens_per_s
        ));
    });
    bar.finish();
    // An interrupted run is an error to the caller (exit status 130); main prints how to continue.
    let outcome = outcome?;
    let summary = serde_json::to_string_pretty(&outcome)?;
    supportlm_data::fsio::write_atomic(&args.out.join("outcome.json"), summary.as_bytes())?;
    println!("{summary}");
    Ok(())
}
