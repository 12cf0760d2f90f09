//! `cargo xtask pipeline`: the study end to end. Steps, in order:
//! setup → data (check, splits, statistics) → t1-baselines (TF-IDF + logistic regression; 0-shot and
//! 10-shot, both decision rules and the calibrated constrained rule) →
//! t1-sft (QLoRA training) → t1-sft-eval → t1-intent-baselines, t1-intent-sft, t1-intent-sft-eval (the
//! same on the 27 intents, in `t1-intent/`) → t2-baselines (0-shot and 10-shot responses, TF-IDF
//! retrieval of a training reply) → t2-sft →
//! t2-sft-eval (gold categories, and the chain: categories predicted by the Task 1 adapter) →
//! efficiency (one training step per mode) → learning-curve (SFT macro-F1 against the
//! number of training examples) → hparams (learning rates on the quick training budget) → t1-ood (every
//! Task 1 method on the hand-written out-of-distribution messages of `data/ood/`) → t1-recipes (Task 1
//! training recipes for generalising beyond Bitext's templates, chosen on `data/ood/dev.csv`) →
//! robustness (prompt injection, abusive, off-topic and noisy messages, with and without the guard) →
//! report.
//!
//! Every step records a hash of its inputs and settings in `runs/<name>/steps/<step>.json` when it
//! finishes; a later run skips a step whose record matches. A step that was interrupted continues
//! where it stopped (evaluations and training are resumable); one whose inputs changed starts over.
//! Work is done by the `supportlm` binary, each step logging to `runs/<name>/logs/<step>.log`.

mod analysis;
mod data;
mod human;
mod ood;
mod recipes;
mod report;
mod robustness;
mod summary;
mod sweeps;
mod tables;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use supportlm_data::fsio::{sha256_hex, write_atomic};

pub use report::publish;

#[derive(Args)]
pub struct PipelineArgs {
    /// The quick variant (smaller subsets; what the README runs).
    #[arg(long)]
    quick: bool,
    /// Name of the run: outputs go to runs/<name>/. Default: `quick` or `full`.
    #[arg(long)]
    name: Option<String>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Start at this step (earlier steps must have finished before).
    #[arg(long, value_enum)]
    from: Option<Step>,
    /// Run only this step.
    #[arg(long, value_enum)]
    only: Option<Step>,
    /// Stop after this step.
    #[arg(long, value_enum)]
    to: Option<Step>,
}

/// The pipeline's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Setup,
    Data,
    T1Baselines,
    T1Sft,
    T1SftEval,
    T1IntentBaselines,
    T1IntentSft,
    T1IntentSftEval,
    T2Baselines,
    T2Sft,
    T2SftEval,
    Efficiency,
    LearningCurve,
    Hparams,
    T1Ood,
    T1Recipes,
    Robustness,
    Report,
}

impl Step {
    pub const ALL: [Step; 18] = [
        Step::Setup,
        Step::Data,
        Step::T1Baselines,
        Step::T1Sft,
        Step::T1SftEval,
        Step::T1IntentBaselines,
        Step::T1IntentSft,
        Step::T1IntentSftEval,
        Step::T2Baselines,
        Step::T2Sft,
        Step::T2SftEval,
        Step::Efficiency,
        Step::LearningCurve,
        Step::Hparams,
        Step::T1Ood,
        Step::T1Recipes,
        Step::Robustness,
        Step::Report,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Data => "data",
            Step::T1Baselines => "t1-baselines",
            Step::T1Sft => "t1-sft",
            Step::T1SftEval => "t1-sft-eval",
            Step::T1IntentBaselines => "t1-intent-baselines",
            Step::T1IntentSft => "t1-intent-sft",
            Step::T1IntentSftEval => "t1-intent-sft-eval",
            Step::T2Baselines => "t2-baselines",
            Step::T2Sft => "t2-sft",
            Step::T2SftEval => "t2-sft-eval",
            Step::Efficiency => "efficiency",
            Step::LearningCurve => "learning-curve",
            Step::Hparams => "hparams",
            Step::T1Ood => "t1-ood",
            Step::T1Recipes => "t1-recipes",
            Step::Robustness => "robustness",
            Step::Report => "report",
        }
    }
}

/// How much work a run does.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub quick: bool,
    /// Task 1 test items (`None`: the whole test split).
    pub t1_items: Option<usize>,
    pub t1_config: &'static str,
    /// Task 1 on the 27 intents: test items (`None`: the whole test split) and the SFT config.
    pub t1_intent_items: Option<usize>,
    pub t1_intent_config: &'static str,
    pub t2_items: usize,
    pub judge_items: usize,
    pub t2_config: &'static str,
    /// Training shapes (batch, tokens) of the efficiency step.
    pub shapes: Vec<(usize, usize)>,
    /// Learning curve: training set sizes (balanced over the labels; the Task 1 SFT run is the last
    /// point) and the examples each point sees at least (small sets are repeated over epochs).
    pub curve_sizes: Vec<usize>,
    pub curve_min_seen: usize,
    /// Learning-rate comparison: the rates, on this many training examples (one epoch).
    pub hp_lrs: Vec<f64>,
    pub hp_examples: usize,
    /// Test items each learning-curve and learning-rate point is evaluated on.
    pub sweep_items: usize,
    /// Training examples of each recipe of `configs/task1-recipes.toml` (unless it sets its own).
    pub recipe_examples: usize,
    /// Training rows each TF-IDF baseline is fitted on, balanced over the labels (`None`: the whole
    /// train split). The L-BFGS fit on all 21,488 rows takes about 100 s for the 27 intents on 2 cores.
    pub tfidf_train: Option<usize>,
    /// Messages of the out-of-distribution set each method is scored on (`None`: all of them).
    pub ood_items: Option<usize>,
    /// Clean messages of the robustness set whose variants are scored (`None`: all of them).
    pub robustness_messages: Option<usize>,
    /// Clean messages of the robustness set whose variants get a Task 2 reply (generation is the
    /// costly part: each message makes 10 replies per run, and a 1-shot-per-category prompt writes
    /// about 0.2 replies/s on 2 cores against 0.7 for 0-shot).
    pub robustness_reply_messages: usize,
    pub seed: u64,
}

impl Budget {
    fn new(quick: bool, seed: u64) -> Self {
        if quick {
            Budget {
                quick,
                t1_items: Some(100),
                t1_config: "configs/task1-category-quick.toml",
                t1_intent_items: Some(60),
                t1_intent_config: "configs/task1-intent-quick.toml",
                t2_items: 20,
                judge_items: 10,
                t2_config: "configs/task2-response-quick.toml",
                shapes: vec![(4, 64)],
                curve_sizes: vec![11, 55],
                curve_min_seen: 55,
                hp_lrs: vec![2e-4, 3e-3],
                hp_examples: 55,
                sweep_items: 60,
                recipe_examples: 110,
                tfidf_train: Some(5400),
                ood_items: Some(66),
                // One message per category: 110 variants and the 40 off-topic messages for Task 1,
                // one message's 10 variants for Task 2.
                robustness_messages: Some(11),
                robustness_reply_messages: 1,
                seed,
            }
        } else {
            Budget {
                quick,
                t1_items: None,
                t1_config: "configs/task1-category.toml",
                // Scoring 27 candidate labels per item runs at 1.3-2 items/s for the prompting
                // methods on 2 cores (categories: 3.4-5.2): the whole intent split (2,692 items)
                // would take about 1 h for them alone; 810 items (30 per intent on average) took
                // 19 min with TF-IDF (2026-12-07).
                t1_intent_items: Some(810),
                t1_intent_config: "configs/task1-intent.toml",
                t2_items: 200,
                judge_items: 50,
                t2_config: "configs/task2-response.toml",
                shapes: vec![(8, 128), (4, 64)],
                curve_sizes: vec![11, 110, 1100],
                curve_min_seen: 110,
                // The config's own rate (1e-3) on 110 examples is the learning curve's point.
                hp_lrs: vec![2e-4, 3e-3],
                hp_examples: 110,
                sweep_items: 500,
                recipe_examples: 1100,
                tfidf_train: None,
                ood_items: None,
                robustness_messages: None,
                robustness_reply_messages: 11,
                seed,
            }
        }
    }
}

/// Task 2's baselines (folders under `t2/`, each its `eval respond --method`); `retrieval` is the
/// classical one, the nearest training message's reply.
const T2_BASELINES: [&str; 3] = ["zero-shot", "few-shot", "retrieval"];

/// What a finished step leaves in `steps/<step>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub hash: String,
    /// Wall time of the step, interrupted attempts included.
    pub seconds: f64,
    /// The part of `seconds` spent in earlier, interrupted attempts (each counted from its start to
    /// the last write to the step's log or outputs).
    #[serde(default)]
    pub interrupted_seconds: f64,
}

/// The run folder and what the steps share.
pub struct Run {
    pub root: PathBuf,
    pub dir: PathBuf,
    pub budget: Budget,
    pub name: String,
    exe: PathBuf,
}

impl Run {
    fn steps_dir(&self) -> PathBuf {
        self.dir.join("steps")
    }

    pub fn record(&self, step: Step) -> Option<StepRecord> {
        let p = self.steps_dir().join(format!("{}.json", step.name()));
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    }

    /// The hash of a step's inputs: its name, the parts of the budget it uses, the config files it
    /// reads (the prompts of `configs/prompts.toml` included), and the hashes of the steps it depends
    /// on (so a change to one step's settings reruns that step and what depends on it, nothing else).
    fn hash(&self, step: Step) -> anyhow::Result<String> {
        let b = &self.budget;
        let file_hash = |rel: &str| -> anyhow::Result<String> {
            Ok(sha256_hex(
                &std::fs::read(self.root.join(rel)).with_context(|| format!("reading {rel}"))?,
            ))
        };
        let settings = match step {
            Step::Setup | Step::Data | Step::T1Sft | Step::T1IntentSft | Step::T2Sft => {
                serde_json::json!({})
            }
            Step::T1Baselines | Step::T1SftEval => serde_json::json!({ "items": b.t1_items }),
            Step::T1IntentBaselines | Step::T1IntentSftEval => {
                serde_json::json!({ "items": b.t1_intent_items })
            }
            Step::T2Baselines => serde_json::json!({
                "items": b.t2_items, "judge": b.judge_items, "runs": T2_BASELINES
            }),
            Step::T2SftEval => serde_json::json!({ "items": b.t2_items, "judge": b.judge_items }),
            Step::Efficiency => serde_json::json!({ "shapes": b.shapes }),
            Step::LearningCurve => serde_json::json!({
                "sizes": b.curve_sizes, "min_seen": b.curve_min_seen, "items": b.sweep_items
            }),
            Step::Hparams => serde_json::json!({
                "lrs": b.hp_lrs, "examples": b.hp_examples, "items": b.sweep_items
            }),
            Step::T1Ood => serde_json::json!({
                "set": file_hash(ood::OOD_FILE)?,
                "curve": b.curve_sizes,
                "items": b.ood_items,
            }),
            Step::T1Recipes => serde_json::json!({
                "dev": file_hash(recipes::DEV_FILE)?,
                "ood": file_hash(ood::OOD_FILE)?,
                "recipes": file_hash(recipes::RECIPES_FILE)?,
                "examples": b.recipe_examples,
                "items": b.sweep_items,
                "ood_items": b.ood_items,
            }),
            Step::Robustness => serde_json::json!({
                "set": file_hash(robustness::ROBUSTNESS_FILE)?,
                "messages": b.robustness_messages,
                "reply_messages": b.robustness_reply_messages,
            }),
            Step::Report => serde_json::to_value(b)?,
        };
        // Only a limited TF-IDF fit enters the hash (runs recorded before the setting existed fitted
        // on the whole split and stay valid).
        let mut settings = settings;
        if let (Some(n), Step::T1Baselines | Step::T1IntentBaselines | Step::T1Ood) =
            (b.tfidf_train, step)
        {
            settings["tfidf_train"] = serde_json::json!(n);
        }
        let mut text = format!("{}\nseed {}\n{settings}\n", step.name(), b.seed);
        if !matches!(step, Step::Setup | Step::Data | Step::Efficiency) {
            // Every step that prompts a model or trains on conversations depends on the prompts.
            text += &format!("prompts {}\n", supportlm_data::prompts::sha256());
        }
        let config = match step {
            Step::T1Sft => Some(self.budget.t1_config),
            Step::T1IntentSft => Some(self.budget.t1_intent_config),
            Step::T2Sft => Some(self.budget.t2_config),
            Step::LearningCurve | Step::Hparams | Step::T1Recipes => Some(self.budget.t1_config),
            _ => None,
        };
        if let Some(c) = config {
            let p = self.root.join(c);
            text +=
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        }
        let deps: &[Step] = match step {
            Step::Setup | Step::Data | Step::Efficiency => &[],
            Step::T1SftEval => &[Step::Data, Step::T1Sft],
            Step::T1IntentSftEval => &[Step::Data, Step::T1IntentSft],
            Step::T2SftEval => &[Step::Data, Step::T1Sft, Step::T2Sft],
            Step::T1Ood => &[Step::Data, Step::T1Sft, Step::LearningCurve],
            Step::T1Recipes => &[Step::Data, Step::T1Sft],
            Step::Robustness => &[Step::Data, Step::T1Sft, Step::T2Sft],
            Step::Report => &[
                Step::Data,
                Step::T1Baselines,
                Step::T1SftEval,
                Step::T1IntentBaselines,
                Step::T1IntentSftEval,
                Step::T2Baselines,
                Step::T2SftEval,
                Step::Efficiency,
                Step::LearningCurve,
                Step::Hparams,
                Step::T1Ood,
                Step::T1Recipes,
                Step::Robustness,
            ],
            _ => &[Step::Data],
        };
        for d in deps {
            text += &self.record(*d).map(|r| r.hash).unwrap_or_default();
        }
        Ok(sha256_hex(text.as_bytes()))
    }

    fn log_path(&self, step: Step) -> PathBuf {
        self.dir.join("logs").join(format!("{}.log", step.name()))
    }

    /// Runs `supportlm` with `args`, its output going to the step's log.
    pub fn supportlm(&self, step: Step, args: &[String]) -> anyhow::Result<()> {
        let log_path = self.log_path(step);
        let status = crate::utils::run_logged(&self.exe, &self.root, &log_path, step.name(), args)?;
        if !status.success() {
            bail!(
                "step {} failed ({status}); its log is {}. Fix the cause, then re-run it alone with \
                 `cargo xtask pipeline{} --only {}` (finished work is kept)",
                step.name(),
                log_path.display(),
                if self.budget.quick { " --quick" } else { "" },
                step.name()
            );
        }
        Ok(())
    }

    /// Runs an evaluation (`supportlm eval … --out DIR`) unless DIR holds a finished one: a step
    /// resumed after an interruption does not redo the evaluations it had finished.
    fn evaluation(&self, step: Step, args: &[String]) -> anyhow::Result<()> {
        let out = args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        if let Some(out) = out.filter(|o| finished_evaluation(o)) {
            eprintln!("[{}] {} finished before: kept", step.name(), out.display());
            return Ok(());
        }
        self.supportlm(step, args)
    }

    pub fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }
}

/// An evaluation folder whose run finished: its metrics are written and no partial results are left
/// (the evaluations write `metrics.json` last, then remove their `*.partial.jsonl`).
fn finished_evaluation(out: &Path) -> bool {
    let partial = std::fs::read_dir(out).ok().is_some_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial.jsonl"))
    });
    out.join("metrics.json").exists() && !partial
}

fn read_seconds(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0)
}

/// How long an interrupted attempt ran: from its start (when `started` was written) to the last
/// write to the step's log or outputs. 0 when unknown.
fn interrupted_seconds(started: &Path, log: &Path, outputs: &[PathBuf]) -> f64 {
    let Some(start) = std::fs::metadata(started).and_then(|m| m.modified()).ok() else {
        return 0.0;
    };
    let last = std::iter::once(log)
        .chain(outputs.iter().map(PathBuf::as_path))
        .filter_map(latest_write)
        .max();
    last.and_then(|t| t.duration_since(start).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The latest modification time of the file `path` or of the files under the folder `path`.
fn latest_write(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| latest_write(&e.path()))
        .max()
}

fn step_outputs(run: &Run, step: Step) -> anyhow::Result<Vec<PathBuf>> {
    let d = |p: &str| run.dir.join(p);
    Ok(match step {
        Step::Setup => vec![],
        Step::Data => vec![d("data")],
        Step::T1Baselines => vec![
            d("t1/zero-shot-constrained"),
            d("t1/zero-shot-generate"),
            d("t1/few-shot-constrained"),
            d("t1/few-shot-generate"),
            d("t1/zero-shot-calibrated"),
            d("t1/few-shot-calibrated"),
        ],
        Step::T1IntentBaselines => [
            "zero-shot-constrained",
            "zero-shot-generate",
            "few-shot-constrained",
            "few-shot-generate",
            "zero-shot-calibrated",
            "few-shot-calibrated",
            "tfidf",
        ]
        .iter()
        .map(|f| d(&format!("t1-intent/{f}")))
        .collect(),
        Step::T1Sft => vec![d("t1/sft-train")],
        Step::T1IntentSft => vec![d("t1-intent/sft-train")],
        Step::T1SftEval => vec![d("t1/sft-constrained"), d("t1/sft-generate")],
        Step::T1IntentSftEval => vec![d("t1-intent/sft-constrained"), d("t1-intent/sft-generate")],
        Step::T2Baselines => T2_BASELINES.iter().map(|f| d(&format!("t2/{f}"))).collect(),
        Step::T2Sft => vec![d("t2/sft-train")],
        Step::T2SftEval => vec![d("t2/sft"), d("t2/sft-chain")],
        Step::Efficiency => vec![d("efficiency")],
        Step::LearningCurve | Step::Hparams => sweeps::outputs(run, step)?,
        Step::T1Ood => ood::outputs(run),
        Step::T1Recipes => recipes::outputs(run)?,
        Step::Robustness => robustness::outputs(run),
        Step::Report => vec![],
    })
}

/// Task 1's evaluations for `task` (category or intent): the prompting baselines (the constrained,
/// calibrated and generate rules from one pass; TF-IDF) or the SFT adapter's (constrained and
/// generate), in `t1/` or `t1-intent/`.
fn task1_evaluations(run: &Run, step: Step, task: &str) -> anyhow::Result<()> {
    let b = &run.budget;
    let seed = b.seed.to_string();
    let s = |x: &str| x.to_string();
    let baselines = matches!(step, Step::T1Baselines | Step::T1IntentBaselines);
    let (folder, items) = if task == "intent" {
        ("t1-intent", b.t1_intent_items)
    } else {
        ("t1", b.t1_items)
    };
    let methods: &[&str] = if baselines {
        &["zero-shot", "few-shot"]
    } else {
        &["sft"]
    };
    // `eval <command>` on the task's seeded test items.
    let on_items = |command: &str| {
        let mut args = vec![
            s("eval"),
            s(command),
            s("--task"),
            s(task),
            s("--data"),
            run.path(&format!("data/{task}")),
            s("--seed"),
            seed.clone(),
        ];
        if let Some(n) = items {
            args.extend([s("--limit"), n.to_string()]);
        }
        args
    };
    for method in methods {
        let out = |decision: &str| run.path(&format!("{folder}/{method}-{decision}"));
        let mut common = on_items("classify");
        common.extend([s("--method"), s(method)]);
        if *method == "sft" {
            common.extend([
                s("--adapter"),
                run.path(&format!("{folder}/sft-train/best-adapter")),
            ]);
        }
        let alone = |decision: &str| {
            let mut args = common.clone();
            args.extend([s("--decision"), s(decision), s("--out"), out(decision)]);
            args
        };
        // A rule run alone before (a finished result is kept, a partial one continued) stays alone.
        let started_alone = |d: &str| {
            let dir = PathBuf::from(out(d));
            std::fs::metadata(dir.join("predictions.partial.jsonl")).is_ok_and(|m| m.len() > 0)
                || finished_evaluation(&dir)
        };
        // Contextual calibration (prompting only) reuses the constrained rule's scores, divided by
        // those of content-free messages.
        let calibrated = *method != "sft";
        let scored_alone = ["constrained", "generate"].iter().any(|d| started_alone(d));
        let calibrated_alone = calibrated && (scored_alone || started_alone("calibrated"));
        if scored_alone {
            for decision in ["constrained", "generate"] {
                run.evaluation(step, &alone(decision))?;
            }
        } else {
            // Every rule from one pass per item.
            let mut args = common.clone();
            args.extend([
                s("--decision"),
                s("both"),
                s("--out"),
                out("constrained"),
                s("--generate-out"),
                out("generate"),
            ]);
            if calibrated && !calibrated_alone {
                args.extend([s("--calibrated-out"), out("calibrated")]);
            }
            run.supportlm(step, &args)?;
        }
        if calibrated_alone {
            run.evaluation(step, &alone("calibrated"))?;
        }
    }
    if baselines {
        let mut args = on_items("tfidf");
        args.extend([s("--out"), run.path(&format!("{folder}/tfidf"))]);
        if let Some(n) = b.tfidf_train {
            args.extend([s("--train-limit"), n.to_string()]);
        }
        run.supportlm(step, &args)?;
    }
    Ok(())
}

fn run_step(run: &Run, step: Step) -> anyhow::Result<()> {
    let b = &run.budget;
    let seed = b.seed.to_string();
    let s = |x: &str| x.to_string();
    match step {
        Step::Setup => crate::commands::setup::run(&run.root),
        Step::Data => data::run(run),
        Step::T1Baselines | Step::T1SftEval => task1_evaluations(run, step, "category"),
        Step::T1IntentBaselines | Step::T1IntentSftEval => task1_evaluations(run, step, "intent"),
        Step::T1Sft | Step::T1IntentSft | Step::T2Sft => {
            let (config, data, out) = match step {
                Step::T1Sft => (b.t1_config, "data/category", "t1/sft-train"),
                Step::T1IntentSft => (b.t1_intent_config, "data/intent", "t1-intent/sft-train"),
                _ => (b.t2_config, "data/response", "t2/sft-train"),
            };
            let mut args = vec![
                s("train"),
                s("--config"),
                s(config),
                s("--set"),
                format!("seed={seed}"),
                s("--data"),
                run.path(data),
                s("--out"),
                run.path(out),
            ];
            if run.dir.join(out).exists() {
                args.push(s("--resume"));
            }
            run.supportlm(step, &args)
        }
        Step::T2Baselines | Step::T2SftEval => {
            // `sft-chain`: the demo's chain, the Task 2 adapter writing for the category the Task 1
            // adapter predicts.
            let runs: &[&str] = if step == Step::T2Baselines {
                &T2_BASELINES
            } else {
                &["sft", "sft-chain"]
            };
            for folder in runs {
                let method = folder.trim_end_matches("-chain");
                let mut args = vec![
                    s("eval"),
                    s("respond"),
                    s("--method"),
                    s(method),
                    s("--data"),
                    run.path("data/response"),
                    s("--limit"),
                    b.t2_items.to_string(),
                    s("--judge-items"),
                    b.judge_items.to_string(),
                    s("--seed"),
                    seed.clone(),
                    s("--out"),
                    run.path(&format!("t2/{folder}")),
                ];
                if method == "sft" {
                    args.extend([s("--adapter"), run.path("t2/sft-train/best-adapter")]);
                }
                if folder.ends_with("-chain") {
                    args.extend([
                        s("--category-adapter"),
                        run.path("t1/sft-train/best-adapter"),
                    ]);
                }
                run.evaluation(step, &args)?;
            }
            Ok(())
        }
        Step::Efficiency => {
            let dir = run.dir.join("efficiency");
            std::fs::create_dir_all(&dir)?;
            let mut lines = String::new();
            for &(batch, seq) in &b.shapes {
                for mode in crate::commands::bench::train::Mode::ALL {
                    eprintln!("[efficiency] {} at {batch}x{seq}", mode.name());
                    let v = crate::commands::bench::train::child(mode, batch, seq)?;
                    lines += &format!("{}\n", serde_json::to_string(&v)?);
                }
            }
            // Each line carries its own matmul rates, measured in its child right after its steps.
            write_atomic(&dir.join("steps.jsonl"), lines.as_bytes())?;
            Ok(())
        }
        Step::LearningCurve | Step::Hparams => sweeps::run_points(run, step),
        Step::T1Ood => ood::run_step(run),
        Step::T1Recipes => recipes::run_step(run),
        Step::Robustness => robustness::run_step(run),
        Step::Report => report::write(run),
    }
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| if args.quick { "quick" } else { "full" }.to_string());
    let root = crate::utils::workspace_root();
    let dir = root.join("runs").join(&name);
    std::fs::create_dir_all(dir.join("steps"))?;
    let _lock = crate::utils::lock_folder(&dir, "pipeline")?;
    let exe = crate::utils::build_cli(&root)?;
    let run = Run {
        root,
        dir,
        budget: Budget::new(args.quick, args.seed),
        name,
        exe,
    };
    let started = Instant::now();
    for step in Step::ALL {
        if args.only.is_some_and(|o| o != step)
            || args.from.is_some_and(|f| step < f)
            || args.to.is_some_and(|t| step > t)
        {
            continue;
        }
        let hash = run.hash(step)?;
        let record_path = run.steps_dir().join(format!("{}.json", step.name()));
        let started_path = run.steps_dir().join(format!("{}.started", step.name()));
        let outputs = step_outputs(&run, step)?;
        if step != Step::Report && step != Step::Setup {
            if let Some(r) = run.record(step) {
                if r.hash == hash && outputs.iter().all(|p| p.exists()) {
                    eprintln!(
                        "[{}] done before with the same inputs: skipped",
                        step.name()
                    );
                    continue;
                }
            }
        }
        // Outputs of an interrupted attempt with the same inputs are continued; others are removed.
        let same_attempt = std::fs::read_to_string(&started_path).is_ok_and(|h| h == hash);
        let earlier_path = run.steps_dir().join(format!("{}.earlier", step.name()));
        let mut earlier = 0.0;
        if same_attempt {
            earlier = read_seconds(&earlier_path)
                + interrupted_seconds(&started_path, &run.log_path(step), &outputs);
            write_atomic(&earlier_path, format!("{earlier}").as_bytes())?;
        } else {
            let _ = std::fs::remove_file(&earlier_path);
            for p in &outputs {
                if p.exists() {
                    std::fs::remove_dir_all(p)
                        .with_context(|| format!("removing stale {}", p.display()))?;
                }
            }
        }
        write_atomic(&started_path, hash.as_bytes())?;
        let t = Instant::now();
        run_step(&run, step)?;
        let record = StepRecord {
            step,
            hash,
            seconds: earlier + t.elapsed().as_secs_f64(),
            interrupted_seconds: earlier,
        };
        write_atomic(
            &record_path,
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        let _ = std::fs::remove_file(&started_path);
        let _ = std::fs::remove_file(&earlier_path);
        eprintln!("[{}] finished in {:.0}s", step.name(), record.seconds);
    }
    let report = run.dir.join("report.md");
    eprintln!(
        "pipeline `{}` done in {:.0}s{}",
        run.name,
        started.elapsed().as_secs_f64(),
        if report.exists() {
            format!(": {}", report.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(budget: Budget) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let run = Run {
            root: crate::utils::workspace_root(),
            dir: dir.path().to_path_buf(),
            budget,
            name: "test".into(),
            exe: PathBuf::new(),
        };
        Step::ALL.iter().map(|&s| run.hash(s).unwrap()).collect()
    }

    #[test]
    fn an_evaluation_is_finished_when_its_metrics_are_written_and_no_partial_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        assert!(!finished_evaluation(&out.join("missing")));
        std::fs::write(out.join("predictions.partial.jsonl"), "").unwrap();
        assert!(!finished_evaluation(out));
        std::fs::write(out.join("metrics.json"), "{}").unwrap();
        assert!(
            !finished_evaluation(out),
            "metrics with a partial file left"
        );
        std::fs::remove_file(out.join("predictions.partial.jsonl")).unwrap();
        assert!(finished_evaluation(out));
    }

    #[test]
    fn an_interrupted_attempt_counts_until_its_last_write() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let at = |p: &Path, t: SystemTime| {
            std::fs::File::options()
                .append(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        let t0 = SystemTime::now() - Duration::from_secs(1000);
        let started = dir.path().join("x.started");
        let log = dir.path().join("x.log");
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("inner")).unwrap();
        for p in [&started, &log, &out.join("inner/metrics.jsonl")] {
            std::fs::write(p, "x").unwrap();
        }
        at(&started, t0);
        at(&log, t0 + Duration::from_secs(100));
        at(
            &out.join("inner/metrics.jsonl"),
            t0 + Duration::from_secs(250),
        );
        // Directories count by their newest file, not their own time.
        let s = interrupted_seconds(&started, &log, std::slice::from_ref(&out));
        assert!((250.0..1000.0).contains(&s), "{s}");
        assert_eq!(
            interrupted_seconds(&dir.path().join("none"), &log, &[]),
            0.0
        );
    }

    #[test]
    fn a_step_hash_changes_only_with_what_the_step_uses() {
        let base = hashes(Budget::new(true, 42));
        assert_eq!(base, hashes(Budget::new(true, 42)), "hashes are stable");
        let mut b = Budget::new(true, 42);
        b.sweep_items += 1;
        let changed: Vec<&str> = hashes(b)
            .iter()
            .zip(&base)
            .zip(Step::ALL)
            .filter(|((x, y), _)| x != y)
            .map(|(_, s)| s.name())
            .collect();
        assert_eq!(
            changed,
            ["learning-curve", "hparams", "t1-recipes", "report"]
        );
        // Another seed changes every step that draws from it.
        let other = hashes(Budget::new(true, 7));
        assert!(other.iter().zip(&base).skip(1).all(|(x, y)| x != y));
    }
}
