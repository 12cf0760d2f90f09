//! Evaluation metrics for supportlm, checked against scikit-learn and statsmodels
//! (`tests/fixtures/metrics/`). Plain Rust: usable without a model.
//!
//! What lives where:
//! - [`classification`]: accuracy, per-class and averaged precision/recall/F1, confusion matrix,
//!   Cohen's kappa, Matthews correlation.
//! - [`agreement`]: agreement between human raters (Cohen's kappa for two, Fleiss' for more).
//! - [`intervals`]: Wilson score interval and seeded bootstrap confidence intervals.
//! - [`significance`]: McNemar's test (exact binomial and continuity-corrected chi-square).
//! - [`text`]: ROUGE-1/2/L/Lsum (rouge-score), BLEU (sacrebleu, 13a) and chrF for responses.
//! - [`degeneration`]: empty, looping and prompt-leaking generations.
//! - [`porter`]: NLTK's Porter stemmer, for ROUGE with stemming.

pub mod agreement;
pub mod classification;
pub mod degeneration;
pub mod intervals;
pub mod porter;
pub mod significance;
pub mod text;

pub use agreement::{cohen_kappa, fleiss_kappa};
pub use classification::{ClassScores, ClassificationReport};
pub use intervals::{bootstrap_ci, wilson_interval, Interval};
pub use significance::{mcnemar, two_proportion_test, McNemar, TwoProportions};
