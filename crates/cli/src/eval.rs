//! `supportlm eval classify`: Task 1 with a prompting method or an SFT adapter, either decision rule.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{load_csv, shipped, split, SplitConfig, SplitName, SplitSet, Task};
use supportlm_model::{default_device, Model};
use supportlm_prompting::report::{metrics, write_run, RunInfo};
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
    /// The fine-tuned adapter (PEFT format) for --method sft.
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
        (MethodArg::Sft, None) => bail!("--method sft needs --adapter DIR"),
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
    let bar = ProgressBar::new(records.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} items {per_sec} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let predictions = classify(&model, &records, &options, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish();
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
    };
    let m = metrics(
        &task.labels(),
        &predictions,
        info,
        args.bootstrap,
        args.seed,
    );
    write_run(&args.out, &predictions, &m)?;
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
