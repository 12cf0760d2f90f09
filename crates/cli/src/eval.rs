//! `supportlm eval classify`: Task 1 with a prompting method or an SFT adapter, either decision rule.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{load_csv, shipped, split, SplitConfig, SplitName, SplitSet, Task};
use supportlm_model::{default_device, Model};
use supportlm_prompting::report::{metrics, write_run, RunInfo};
use supportlm_prompting::Prediction;
use supportlm_prompting::{classify, ClassifyOptions, Decision, Method};

use crate::generate::DEFAULT_MODEL;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Task 1: classify customer messages into categories or intents.
    Classify(ClassifyArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    ZeroShot,
    FewShot,
    Sft,
}

#[derive(Clone, Copy, ValueEnum)]
enum DecisionArg {
    Generate,
    Constrained,
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[arg(long, value_enum)]
    method: MethodArg,
    /// The fine-tuned adapter (PEFT format) for --method sft (a fully fine-tuned model is given as
    /// --model instead).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "constrained")]
    decision: DecisionArg,
    /// category or intent.
    #[arg(long, default_value = "category")]
    task: Task,
    #[arg(long, default_value = "test")]
    split: SplitName,
    /// Evaluate N items of the split, drawn with --seed (the same N items for every method).
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A split folder from `supportlm data split` (default: the shipped data split in memory).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Few-shot examples per label (drawn from validation).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Seed for the few-shot draw and the bootstrap.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Divide label log-likelihoods by their token count (constrained rule).
    #[arg(long)]
    length_normalize: bool,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Output folder (predictions.jsonl, metrics.json, classification_report.csv, confusion.csv).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Classify(args) => classify_cmd(args),
    }
}

fn classify_cmd(args: ClassifyArgs) -> anyhow::Result<()> {
    let task = args.task;
    if task == Task::Response {
        bail!("eval classify is for the category and intent tasks (the response task has `eval respond`)");
    }
    let splits = match &args.data {
        Some(dir) => SplitSet::read(dir).with_context(|| format!("reading {}", dir.display()))?,
        None => {
            let input = shipped::default_input();
            shipped::verify_if_shipped(&input)?;
            split::split(
                &load_csv(&input)?,
                &SplitConfig {
                    task,
                    ..Default::default()
                },
            )?
        }
    };
    if splits.config.task != task {
        bail!("the split is for task {}, not {task}", splits.config.task);
    }
    let (method, adapter) = match (args.method, &args.adapter) {
        (MethodArg::Sft, Some(a)) => (Method::Sft, Some(a.clone())),
        // A fully fine-tuned model is a model folder of its own.
        (MethodArg::Sft, None) if args.model != std::path::Path::new(DEFAULT_MODEL) => {
            (Method::Sft, None)
        }
        (MethodArg::Sft, None) => bail!(
            "--method sft needs --adapter DIR (LoRA), or --model DIR for a fully fine-tuned model"
        ),
        (_, Some(_)) => bail!("--adapter only goes with --method sft"),
        (MethodArg::ZeroShot, None) => (Method::ZeroShot, None),
        (MethodArg::FewShot, None) => (Method::FewShot, None),
    };
    let decision = match args.decision {
        DecisionArg::Generate => Decision::Generate,
        DecisionArg::Constrained => Decision::Constrained,
    };
    let mut model = Model::load(&args.model, &default_device())
        .with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(dir) = &adapter {
        model = model
            .load_adapter(dir)
            .with_context(|| format!("applying {}", dir.display()))?;
    }
    let mut records = splits.get(args.split).records.clone();
    if let Some(n) = args.limit {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
        records.shuffle(&mut rng);
        records.truncate(n);
        records.sort_by_key(|r| r.id);
    }
    let examples = if method == Method::FewShot {
        balanced_kshot(
            &splits.validation.records,
            &splits.test.records,
            task,
            args.k,
            args.seed,
        )?
    } else {
        Vec::new()
    };
    let options = ClassifyOptions {
        task,
        method,
        decision,
        examples,
        length_normalize: args.length_normalize,
        max_new_tokens: if task == Task::Intent { 12 } else { 8 },
        batch: 8,
    };
    // Resumable: predictions are appended to a partial file chunk by chunk; a rerun with the same
    // settings continues after the items already there.
    std::fs::create_dir_all(&args.out)?;
    let settings = serde_json::json!({
        "task": task.as_str(), "method": method.as_str(), "decision": decision.as_str(),
        "model": args.model.display().to_string(), "adapter": adapter.as_ref().map(|a| a.display().to_string()),
        "split": args.split.as_str(), "limit": args.limit, "k": args.k, "seed": args.seed,
        "length_normalize": args.length_normalize,
    });
    let settings_path = args.out.join("run.json");
    if let Ok(text) = std::fs::read_to_string(&settings_path) {
        let old: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if old != settings {
            bail!(
                "{} holds a run with other settings ({old}); use another --out",
                args.out.display()
            );
        }
    }
    supportlm_data::fsio::write_atomic(
        &settings_path,
        serde_json::to_string_pretty(&settings)?.as_bytes(),
    )?;
    let partial = args.out.join("predictions.partial.jsonl");
    // Work goes in fixed chunks of the item list (so scoring batches, and with them every float, are the
    // same whether or not the run was interrupted); chunks already in the partial file are skipped.
    const CHUNK: usize = 64;
    let saved = read_partial(&partial);
    let saved_ids: std::collections::HashSet<usize> = saved.iter().map(|p| p.id).collect();
    let chunks: Vec<&[supportlm_data::Record]> = records.chunks(CHUNK).collect();
    let complete = |c: &[supportlm_data::Record]| c.iter().all(|r| saved_ids.contains(&r.id));
    let kept: std::collections::HashSet<usize> = chunks
        .iter()
        .filter(|c| complete(c))
        .flat_map(|c| c.iter().map(|r| r.id))
        .collect();
    let mut done: Vec<_> = saved.into_iter().filter(|p| kept.contains(&p.id)).collect();
    // Rewrite the partial file with whole chunks only.
    let mut lines = String::new();
    for p in &done {
        lines += &serde_json::to_string(p)?;
        lines.push('\n');
    }
    supportlm_data::fsio::write_atomic(&partial, lines.as_bytes())?;
    let todo: Vec<&[supportlm_data::Record]> =
        chunks.iter().filter(|c| !complete(c)).copied().collect();
    let todo_items: usize = todo.iter().map(|c| c.len()).sum();
    if !done.is_empty() {
        tracing::info!(done = done.len(), left = todo_items, "resuming");
    }
    let bar = ProgressBar::new(records.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} items {per_sec} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done.len() as u64);
    let started = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)?;
    for chunk in todo {
        let base = done.len() as u64;
        let preds = classify(&model, chunk, &options, &mut |n, _| {
            bar.set_position(base + n as u64)
        })?;
        let mut lines = String::new();
        for p in &preds {
            lines += &serde_json::to_string(p)?;
            lines.push('\n');
        }
        file.write_all(lines.as_bytes())?;
        file.flush()?;
        done.extend(preds);
    }
    bar.finish();
    let order: std::collections::HashMap<usize, usize> =
        records.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    done.sort_by_key(|p| order.get(&p.id).copied().unwrap_or(usize::MAX));
    let predictions = done;
    let info = RunInfo {
        task: task.to_string(),
        method: method.as_str().into(),
        decision: decision.as_str().into(),
        model: args.model.display().to_string(),
        adapter: adapter.map(|a| a.display().to_string()),
        split: args.split.as_str().into(),
        few_shot_k: if method == Method::FewShot { args.k } else { 0 },
        seed: args.seed,
        seconds: started.elapsed().as_secs_f64(),
        items_timed: todo_items,
    };
    let m = metrics(
        &task.labels(),
        &predictions,
        info,
        args.bootstrap,
        args.seed,
    );
    write_run(&args.out, &predictions, &m)?;
    std::fs::remove_file(&partial)?;
    println!(
        "{task} {} {}: accuracy {:.4} [{:.4}, {:.4}], macro-F1 {:.4} [{:.4}, {:.4}], failed extractions {:.2}%, {:.2} items/s",
        method.as_str(),
        decision.as_str(),
        m.accuracy.estimate,
        m.accuracy.low,
        m.accuracy.high,
        m.macro_f1.estimate,
        m.macro_f1.low,
        m.macro_f1.high,
        100.0 * m.extraction_failed_rate,
        m.items_per_s
    );
    println!("written to {}", args.out.display());
    Ok(())
}

/// The predictions saved so far; a line cut short by a crash (the last one) is dropped.
fn read_partial(path: &std::path::Path) -> Vec<Prediction> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map_while(|l| serde_json::from_str(l).ok())
        .collect()
}
