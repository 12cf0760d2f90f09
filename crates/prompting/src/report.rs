//! What an evaluation run writes: `predictions.jsonl`, `metrics.json`, `classification_report.csv`,
//! `confusion.csv` and the confusion heatmap `confusion.svg` / `confusion.png`, each atomically.

use std::path::Path;

use serde::{Deserialize, Serialize};
use supportlm_metrics::intervals::Z95;
use supportlm_metrics::{bootstrap_ci, wilson_interval, ClassificationReport, Interval};

use crate::classify::Prediction;
use crate::error::{PromptError, Result};
use crate::extract::Extraction;
use crate::judge::JudgeSummary;
use crate::respond::{ItemScores, RespondMetrics, Response};
use supportlm_metrics::degeneration::Degeneration;

/// How a run was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    /// `category` or `intent`.
    pub task: String,
    /// `zero-shot`, `few-shot`, `sft` or `tfidf`.
    pub method: String,
    /// `generate` or `constrained`.
    pub decision: String,
    /// The base model's path.
    pub model: String,
    /// The adapter's path (SFT).
    pub adapter: Option<String>,
    /// The split evaluated.
    pub split: String,
    /// Few-shot examples (0 otherwise).
    pub few_shot_k: usize,
    /// Seed of the item sample, the examples and the bootstrap.
    pub seed: u64,
    /// Wall time of the classification, and how many items it covered (fewer than all when the run
    /// was resumed).
    pub seconds: f64,
    /// Items classified in `seconds`.
    pub items_timed: usize,
    /// Both decision rules came from one pass per item, and `seconds` is that pass's (both rules).
    #[serde(default)]
    pub shared_pass: bool,
    /// sha256 of the prompts file the run used (`configs/prompts.toml`).
    #[serde(default)]
    pub prompts: String,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyMetrics {
    /// What was run.
    pub info: RunInfo,
    /// Items evaluated.
    pub items: usize,
    /// Classification speed.
    pub items_per_s: f64,
    /// Accuracy with Wilson's 95% interval.
    pub accuracy: Interval,
    /// Accuracy and macro-F1 with seeded bootstrap 95% intervals.
    pub accuracy_bootstrap: Interval,
    /// Macro-F1 over the classes present in the truth or the predictions
    /// ([`ClassificationReport::macro_f1_of_present`]), with a seeded bootstrap 95% interval.
    pub macro_f1: Interval,
    /// F1 weighted by support.
    pub weighted_f1: f64,
    /// F1 over all items.
    pub micro_f1: f64,
    /// Cohen's kappa.
    pub cohen_kappa: f64,
    /// Matthews correlation coefficient.
    pub mcc: f64,
    /// Predictions no label could be read from.
    pub extraction_failed: usize,
    /// Their share of the items.
    pub extraction_failed_rate: f64,
    /// Bootstrap resamples behind the intervals.
    pub bootstrap_resamples: usize,
    /// Per-class precision, recall, F1 and the confusion matrix.
    pub report: ClassificationReport,
    /// The most frequent `(truth, prediction, count)` mistakes.
    pub most_confused: Vec<(String, String, usize)>,
    /// Wrong predictions with the highest confidence.
    pub hardest_errors: Vec<Prediction>,
}

/// Computes every metric of a run.
pub fn metrics(
    labels: &[&str],
    predictions: &[Prediction],
    info: RunInfo,
    resamples: usize,
    seed: u64,
) -> ClassifyMetrics {
    let truth: Vec<&str> = predictions.iter().map(|p| p.truth.as_str()).collect();
    let pred: Vec<&str> = predictions.iter().map(|p| p.prediction.as_str()).collect();
    let report = ClassificationReport::compute(labels, &truth, &pred);
    let n = predictions.len();
    let correct: Vec<bool> = predictions.iter().map(Prediction::correct).collect();
    let acc_boot = bootstrap_ci(n, resamples, 0.95, seed, |idx| {
        idx.iter().filter(|&&i| correct[i]).count() as f64 / idx.len().max(1) as f64
    });
    // Over the classes each sample holds: a resample (or a small test set) that misses a class would
    // otherwise count it as F1 0.
    let macro_f1 = bootstrap_ci(n, resamples, 0.95, seed, |idx| {
        let t: Vec<&str> = idx.iter().map(|&i| truth[i]).collect();
        let p: Vec<&str> = idx.iter().map(|&i| pred[i]).collect();
        ClassificationReport::compute(labels, &t, &p).macro_f1_of_present()
    });
    let failed = predictions
        .iter()
        .filter(|p| p.extraction == Extraction::Failed)
        .count();
    ClassifyMetrics {
        items_per_s: info.items_timed as f64 / info.seconds.max(1e-9),
        info,
        items: n,
        accuracy: wilson_interval(report.correct, n, Z95),
        accuracy_bootstrap: acc_boot,
        macro_f1,
        weighted_f1: report.weighted_avg.f1,
        micro_f1: report.micro_avg.f1,
        cohen_kappa: report.cohen_kappa,
        mcc: report.mcc,
        extraction_failed: failed,
        extraction_failed_rate: failed as f64 / n.max(1) as f64,
        bootstrap_resamples: resamples,
        most_confused: report.most_confused(10),
        hardest_errors: crate::errors::most_confident_errors(predictions, 10),
        report,
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    supportlm_fsio::write_atomic(path, bytes).map_err(|e| PromptError::io(path, e))
}

/// Writes the run's files into `dir`.
pub fn write_run(dir: &Path, predictions: &[Prediction], m: &ClassifyMetrics) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PromptError::io(dir, e))?;
    let mut lines = String::new();
    for p in predictions {
        lines += &serde_json::to_string(p).unwrap_or_default();
        lines.push('\n');
    }
    write(&dir.join("predictions.jsonl"), lines.as_bytes())?;
    write(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(m)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    write(
        &dir.join("classification_report.csv"),
        m.report.to_csv().as_bytes(),
    )?;
    let mut cm = format!("true\\predicted,{}\n", m.report.labels.join(","));
    for (l, row) in m.report.labels.iter().zip(&m.report.confusion) {
        cm += &format!(
            "{l},{}\n",
            row.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    write(&dir.join("confusion.csv"), cm.as_bytes())?;
    let title = format!(
        "{} {} {} ({} items)",
        m.info.task, m.info.method, m.info.decision, m.items
    );
    supportlm_plots::heatmap(
        &dir.join("confusion"),
        &title,
        &m.report.labels,
        &m.report.confusion,
    )?;
    Ok(())
}

/// Reads `predictions.jsonl` back.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).map_err(|e| PromptError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| PromptError::Prompt(format!("{} line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}
/// One line of a response run's `predictions.jsonl`: the reply, its scores and its degeneration
/// checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredResponse {
    /// The reply and what it answered.
    #[serde(flatten)]
    pub response: Response,
    /// Its overlap and embedding scores.
    #[serde(flatten)]
    pub scores: ItemScores,
    /// What is wrong with it, if anything.
    pub degeneration: Degeneration,
}

/// The settings of a response run (`run.json`, and `settings` in `metrics.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RespondSettings {
    /// Always `response`.
    pub task: String,
    /// `zero-shot`, `few-shot` or `sft`.
    pub method: String,
    /// The base model's path.
    pub model: String,
    /// The adapter's path (SFT).
    pub adapter: Option<String>,
    /// The split the items come from.
    pub split: String,
    /// How many seeded items.
    pub limit: usize,
    /// Few-shot examples.
    pub k: usize,
    /// Seed of the item sample and of sampling.
    pub seed: u64,
    /// Generation budget per response.
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// sha256 of the prompts file the run used (`configs/prompts.toml`).
    #[serde(default)]
    pub prompts: String,
    /// The Task 1 adapter whose predicted categories the prompts carried (the classify-then-respond
    /// chain); `None`: the dataset's categories.
    #[serde(default)]
    pub category_adapter: Option<String>,
}

/// The classify-then-respond chain: how often the predicted category was the dataset's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CategoryChain {
    /// The Task 1 adapter.
    pub adapter: String,
    /// Items classified.
    pub items: usize,
    /// Share of predicted categories equal to the dataset's (Wilson 95%).
    pub accuracy: Interval,
}

/// How fast responses were generated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerationSpeed {
    /// Wall time of the generation.
    pub seconds: f64,
    /// Items generated in that time (fewer than all when the run was resumed).
    pub items_timed: usize,
    /// `items_timed / seconds`.
    pub items_per_s: f64,
}

/// `metrics.json` of a response run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RespondRunMetrics {
    /// What was run.
    pub settings: RespondSettings,
    /// Generation speed.
    pub generation: GenerationSpeed,
    /// Overlap, embedding and degeneration scores.
    pub scores: RespondMetrics,
    /// The judge's means, when a judge ran.
    pub judge: Option<JudgeSummary>,
    /// What the report should say about the judge (e.g. that a 135M judge is weak evidence).
    pub judge_note: Option<String>,
    /// The classify-then-respond chain's Task 1 accuracy, when the categories were predicted.
    #[serde(default)]
    pub chain: Option<CategoryChain>,
}
