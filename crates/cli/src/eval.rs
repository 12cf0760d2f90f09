//! `supportlm eval classify`: Task 1 with a prompting method or an SFT adapter, either decision rule.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{Record, SplitName, SplitSet, Task};
use supportlm_prompting::report::{metrics, write_run, RunInfo};
use supportlm_prompting::Prediction;
use supportlm_prompting::{classify, classify_rules, ClassifyOptions, Decision, Method};

use crate::resume::{claim_folder, item_bar, run_chunks};
use crate::shared::{load_model, load_splits, method_of, sample, MethodArg, DEFAULT_MODEL};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Task 1: classify customer messages into categories or intents.
    Classify(ClassifyArgs),
    /// Task 2: write support responses and score them (ROUGE, BLEU, chrF, embedding cosine, judge).
    Respond(Box<crate::respond::RespondArgs>),
    /// Task 1's classical baseline: TF-IDF + logistic regression trained on the train split.
    Tfidf(TfidfArgs),
    /// Task 1 on the robustness set (injection, abusive, off-topic, noisy), with or without the guard.
    Robustness(Box<crate::robustness::RobustnessArgs>),
    /// Task 2: a blinded sheet for human raters (responses of several runs, shuffled per item) and
    /// its key.
    ExportHuman(crate::human::ExportHumanArgs),
    /// Task 2: filled sheets read back: each method's mean per criterion with intervals, and the
    /// raters' agreement (Cohen's kappa for two, Fleiss' for more).
    ImportHuman(crate::human::ImportHumanArgs),
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum DecisionArg {
    Generate,
    Constrained,
    /// The constrained rule after contextual calibration (label probabilities divided by those of
    /// content-free messages: "N/A", "", "[MASK]").
    Calibrated,
    /// Both rules from one pass per item: constrained results to --out, generated to --generate-out.
    Both,
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
    #[command(flatten)]
    items: Items,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Few-shot examples per label (drawn from validation).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Divide label log-likelihoods by their token count (constrained rule).
    #[arg(long)]
    length_normalize: bool,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Output folder (predictions.jsonl, metrics.json, classification_report.csv, confusion.csv).
    #[arg(long)]
    out: PathBuf,
    /// With --decision both: the output folder of the generate rule (--out gets the constrained one).
    #[arg(long)]
    generate_out: Option<PathBuf>,
    /// With --decision constrained or both: the calibrated rule's results too, from the same pass
    /// (its scores are the constrained rule's, divided by the content-free ones), in this folder.
    #[arg(long)]
    calibrated_out: Option<PathBuf>,
}

/// Which Task 1 items are evaluated (the same for every method).
#[derive(Args)]
pub(crate) struct Items {
    /// category or intent.
    #[arg(long, default_value = "category")]
    task: Task,
    #[arg(long, default_value = "test")]
    split: SplitName,
    /// Evaluate N items of the split, drawn with --seed (the same N items for every method).
    #[arg(long)]
    limit: Option<usize>,
    /// A split folder from `supportlm data split` (default: the shipped data split in memory).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed for the item draw, the few-shot draw and the bootstrap.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate the labelled messages of this CSV (Bitext's columns: flags, instruction, category,
    /// intent, response; e.g. the out-of-distribution set `data/ood/ood.csv`) instead of a split.
    /// Few-shot examples and the TF-IDF model still come from the split's validation and train parts.
    #[arg(long, value_name = "CSV", conflicts_with = "split")]
    items_file: Option<PathBuf>,
}

impl Items {
    /// The items to evaluate (drawn with `--limit`/`--seed`) and how to name where they came from.
    fn records(&self, splits: &SplitSet) -> anyhow::Result<(Vec<Record>, String)> {
        let (records, source) = match &self.items_file {
            Some(path) => {
                let dataset = supportlm_data::load_csv(path)
                    .with_context(|| format!("reading --items-file {}", path.display()))?;
                (dataset.records, format!("file {}", path.display()))
            }
            None => (
                splits.get(self.split).records.clone(),
                self.split.as_str().to_string(),
            ),
        };
        Ok((sample(&records, self.limit, self.seed), source))
    }
}

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Classify(args) => classify_cmd(args),
        EvalCommand::Respond(args) => crate::respond::run(*args),
        EvalCommand::Tfidf(args) => tfidf_cmd(args),
        EvalCommand::Robustness(args) => crate::robustness::run(*args),
        EvalCommand::ExportHuman(args) => crate::human::export_cmd(args),
        EvalCommand::ImportHuman(args) => crate::human::import_cmd(args),
    }
}

fn classify_cmd(args: ClassifyArgs) -> anyhow::Result<()> {
    let task = args.items.task;
    if task == Task::Response {
        bail!("eval classify is for the category and intent tasks (the response task has `eval respond`)");
    }
    let mut outputs: Vec<(Decision, PathBuf)> = match (args.decision, &args.generate_out) {
        (DecisionArg::Both, Some(g)) => vec![
            (Decision::Constrained, args.out.clone()),
            (Decision::Generate, g.clone()),
        ],
        (DecisionArg::Both, None) => {
            bail!("--decision both needs --generate-out DIR for the generate rule's results")
        }
        (_, Some(_)) => bail!("--generate-out goes with --decision both"),
        (DecisionArg::Generate, None) => vec![(Decision::Generate, args.out.clone())],
        (DecisionArg::Constrained, None) => vec![(Decision::Constrained, args.out.clone())],
        (DecisionArg::Calibrated, None) => vec![(Decision::Calibrated, args.out.clone())],
    };
    if let Some(c) = &args.calibrated_out {
        if !matches!(args.decision, DecisionArg::Constrained | DecisionArg::Both) {
            bail!("--calibrated-out goes with --decision constrained or both (it reuses their scores)");
        }
        outputs.push((Decision::Calibrated, c.clone()));
    }
    for (i, (_, out)) in outputs.iter().enumerate() {
        if outputs[..i].iter().any(|(_, o)| o == out) {
            bail!(
                "each rule needs its own output folder: {} is given twice",
                out.display()
            );
        }
    }
    let splits = load_splits(args.items.data.as_deref(), task)?;
    let method = method_of(args.method, args.adapter.as_deref(), &args.model)?;
    let adapter = args.adapter.clone();
    let model = load_model(&args.model, adapter.as_deref())?;
    let (records, source) = args.items.records(&splits)?;
    let examples = if method == Method::FewShot {
        balanced_kshot(
            &splits.validation.records,
            &splits.test.records,
            task,
            args.k,
            args.items.seed,
        )?
    } else {
        Vec::new()
    };
    let options = ClassifyOptions {
        task,
        method,
        decision: outputs[0].0,
        examples,
        length_normalize: args.length_normalize,
        max_new_tokens: if task == Task::Intent { 12 } else { 8 },
        batch: 8,
    };
    // Resumable: predictions are appended to a partial file chunk by chunk; a rerun with the same
    // settings continues after the items already there. Each output folder records the settings of
    // its own rule, as a run of that rule alone would.
    for (decision, out) in &outputs {
        let settings = serde_json::json!({
            "task": task.as_str(), "method": method.as_str(), "decision": decision.as_str(),
            "model": args.model.display().to_string(), "adapter": adapter.as_ref().map(|a| a.display().to_string()),
            "split": source, "limit": args.items.limit, "k": args.k, "seed": args.items.seed,
            "length_normalize": args.length_normalize,
        });
        claim_folder(out, &settings)?;
    }
    let bar = item_bar(records.len(), "items");
    let started = Instant::now();
    let rules: Vec<Decision> = outputs.iter().map(|(d, _)| *d).collect();
    let (per_rule, todo_items, partial): (Vec<Vec<Prediction>>, usize, PathBuf) = if rules.len() > 1
    {
        // One line per item: its prediction under each rule, in `rules`' order.
        let partial = args.out.join("predictions-rules.partial.jsonl");
        let (done, todo) = run_chunks(
            &partial,
            &records,
            64,
            |p: &Vec<Prediction>| p.first().map_or(usize::MAX, |p| p.id),
            &bar,
            &mut |chunk, progress| {
                Ok(classify_rules(
                    &model,
                    chunk,
                    &options,
                    &rules,
                    &mut |n, _| progress(n),
                )?)
            },
        )?;
        let mut per_rule = vec![Vec::with_capacity(done.len()); rules.len()];
        for item in done {
            if item.len() != rules.len() {
                bail!(
                    "{} holds an item with {} predictions for {} rules: remove it to start over",
                    partial.display(),
                    item.len(),
                    rules.len()
                );
            }
            for (rule, p) in per_rule.iter_mut().zip(item) {
                rule.push(p);
            }
        }
        (per_rule, todo, partial)
    } else {
        let partial = args.out.join("predictions.partial.jsonl");
        let (done, todo) = run_chunks(
            &partial,
            &records,
            64,
            |p: &Prediction| p.id,
            &bar,
            &mut |chunk, progress| Ok(classify(&model, chunk, &options, &mut |n, _| progress(n))?),
        )?;
        (vec![done], todo, partial)
    };
    let seconds = started.elapsed().as_secs_f64();
    for ((decision, out), predictions) in outputs.iter().zip(per_rule) {
        let info = RunInfo {
            task: task.to_string(),
            method: method.as_str().into(),
            decision: decision.as_str().into(),
            model: args.model.display().to_string(),
            adapter: adapter.as_ref().map(|a| a.display().to_string()),
            split: source.clone(),
            few_shot_k: if method == Method::FewShot { args.k } else { 0 },
            seed: args.items.seed,
            // With several rules the time is the shared pass's.
            seconds,
            items_timed: todo_items,
            shared_pass: outputs.len() > 1,
            prompts: supportlm_data::prompts::sha256().to_string(),
        };
        let m = metrics(
            &task.labels(),
            &predictions,
            info,
            args.bootstrap,
            args.items.seed,
        );
        write_run(out, &predictions, &m)?;
        println!(
            "{task} {} {}: accuracy {:.4} [{:.4}, {:.4}], macro-F1 {:.4} [{:.4}, {:.4}], failed extractions {:.2}%, {:.2} items/s{}",
            method.as_str(),
            decision.as_str(),
            m.accuracy.estimate,
            m.accuracy.low,
            m.accuracy.high,
            m.macro_f1.estimate,
            m.macro_f1.low,
            m.macro_f1.high,
            100.0 * m.extraction_failed_rate,
            m.items_per_s,
            if outputs.len() > 1 { " (rules from one pass)" } else { "" }
        );
        println!("written to {}", out.display());
    }
    std::fs::remove_file(&partial)?;
    Ok(())
}

#[derive(Args)]
pub struct TfidfArgs {
    #[command(flatten)]
    items: Items,
    /// Fit on N training rows, balanced over the labels and drawn with --seed (default: the whole
    /// train split).
    #[arg(long)]
    train_limit: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Output folder (the files of `eval classify`).
    #[arg(long)]
    out: PathBuf,
}

fn tfidf_cmd(args: TfidfArgs) -> anyhow::Result<()> {
    use supportlm_baseline::{FitOptions, TfIdfLogReg};
    let task = args.items.task;
    if task == Task::Response {
        bail!("the TF-IDF baseline classifies categories or intents");
    }
    let splits = load_splits(args.items.data.as_deref(), task)?;
    let labels = task.labels();
    let index = |r: &Record| {
        let l = task.label_of(r);
        labels.iter().position(|x| *x == l).unwrap_or(0)
    };
    let train = match args.train_limit {
        Some(n) => {
            supportlm_data::kshot::balanced_subset(&splits.train.records, task, n, args.items.seed)
        }
        None => splits.train.records.clone(),
    };
    let texts: Vec<&str> = train.iter().map(|r| r.instruction.as_str()).collect();
    let y: Vec<usize> = train.iter().map(index).collect();
    let started = Instant::now();
    let model = TfIdfLogReg::fit(&texts, &y, labels.len(), FitOptions::default())?;
    let fit_seconds = started.elapsed().as_secs_f64();
    let (records, source) = args.items.records(&splits)?;
    let t = Instant::now();
    let test_texts: Vec<&str> = records.iter().map(|r| r.instruction.as_str()).collect();
    let predictions: Vec<Prediction> = records
        .iter()
        .zip(model.predict(&test_texts))
        .map(|(r, (label, p))| Prediction {
            id: r.id,
            message: r.instruction.clone(),
            truth: task.label_of(r).to_string(),
            prediction: labels[label].to_string(),
            raw: labels[label].to_string(),
            confidence: p,
            extraction: supportlm_prompting::extract::Extraction::Scored,
        })
        .collect();
    let info = RunInfo {
        task: task.to_string(),
        method: "tfidf-logreg".into(),
        decision: "argmax".into(),
        model: format!(
            "TF-IDF ({} uni/bigram features) + logistic regression, fitted on {} train rows in {fit_seconds:.1}s",
            model.tfidf.features(),
            train.len()
        ),
        adapter: None,
        split: source,
        few_shot_k: 0,
        seed: args.items.seed,
        seconds: t.elapsed().as_secs_f64(),
        items_timed: records.len(),
        shared_pass: false,
        prompts: supportlm_data::prompts::sha256().to_string(),
    };
    let m = metrics(&labels, &predictions, info, args.bootstrap, args.items.seed);
    write_run(&args.out, &predictions, &m)?;
    println!(
        "{task} TF-IDF + logistic regression: accuracy {:.4} [{:.4}, {:.4}], macro-F1 {:.4} [{:.4}, {:.4}] (fit {fit_seconds:.1}s)",
        m.accuracy.estimate, m.accuracy.low, m.accuracy.high, m.macro_f1.estimate, m.macro_f1.low, m.macro_f1.high
    );
    println!("written to {}", args.out.display());
    Ok(())
}
