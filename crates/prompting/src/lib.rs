//! Prompting baselines and the classification evaluator (Task 1).
//!
//! What lives where:
//! - [`extract`]: reading a label out of free text (exact, normalised, first mention, nearest by edit
//!   distance, otherwise `EXTRACTION_FAILED`).
//! - [`prompt`]: zero-shot and balanced k-shot prompts, split into the prefix shared by every item and
//!   each item's own tokens.
//! - [`classify`]: the evaluator: a method (zero-shot, few-shot, SFT adapter) and a decision rule
//!   (generate and extract, or constrained label scoring) over a split, with a progress callback;
//!   `classify_rules` gives several rules (constrained, calibrated, generate) from one pass per item.
//! - [`report`]: the run files: Task 1's `predictions.jsonl`, `metrics.json`,
//!   `classification_report.csv`, most-confused pairs and hardest errors; Task 2's `metrics.json`
//!   ([`report::RespondRunMetrics`]).
//! - [`errors`]: error analysis of a run (most-confused pairs and their share of the errors, recall per
//!   label, collapse onto one label, confidence of mistakes, extraction kinds) and the failure-mode
//!   sentences the report prints; [`reply_errors`]: the same for a Task 2 run (ROUGE-L per category,
//!   reply length against the reference, replies cut at the budget, the weakest replies).
//! - [`respond`]: Task 2: generating support responses and scoring them against the references
//!   (ROUGE, BLEU, chrF, embedding cosine, degeneration counts).
//! - [`guard`]: the input guard (chat-template tokens and role tags neutralised; off-topic flagged by a
//!   threshold on the best label's probability) and [`robustness`]: Task 1 on the robustness set
//!   (accuracy per part, flip and attack-success rates, off-topic AUROC); [`robust_reply`]: Task 2 on
//!   the same set (how often a reply leaks the prompt, obeys an injection, or is abusive).
//! - [`human`]: the blinded human-evaluation sheet of Task 2 (export with a key; import: means per
//!   method with intervals, Cohen's or Fleiss' kappa between raters).
//! - [`judge`]: LLM-as-judge with the study's rubric, over a local model or an OpenAI-compatible
//!   endpoint, with robust score parsing.

pub mod classify;
pub mod error;
pub mod errors;
pub mod extract;
pub mod guard;
pub mod human;
pub mod judge;
pub mod prompt;
pub mod reply_errors;
pub mod report;
pub mod respond;
pub mod robust_reply;
pub mod robustness;

pub use classify::{
    classify, classify_rules, label_probabilities, ClassifyOptions, Decision, LabelScorer, Method,
    Prediction,
};
pub use error::{PromptError, Result};
