//! The classical baselines: TF-IDF features (word unigrams and bigrams, scikit-learn's
//! `TfidfVectorizer` conventions: smoothed idf, sublinear tf off, rows L2-normalised), for Task 1 with a
//! multinomial logistic regression fitted by linfa (L-BFGS, L2 penalty), for Task 2 as nearest-neighbour
//! retrieval of a training reply. Sanity anchors for what the language model must beat.
//!
//! - [`TfIdf`]: the vocabulary and idf weights, fitted on training texts.
//! - [`TfIdfLogReg`]: features + classifier; `predict` gives each text's label index and probability.
//! - [`retrieval::Nearest`]: the training text most like a query (cosine of the TF-IDF rows).

pub mod retrieval;

use std::collections::HashMap;

use linfa::prelude::*;
use linfa_logistic::{MultiFittedLogisticRegression, MultiLogisticRegression};
use ndarray::{Array1, Array2};

#[derive(Debug, thiserror::Error)]
/// What can go wrong fitting or using the baseline.
pub enum BaselineError {
    #[error("baseline: {0}")]
    /// The records given cannot be used (empty, unknown label, …).
    Input(String),
    #[error("logistic regression: {0}")]
    /// The logistic regression did not fit.
    Fit(String),
}

/// Result alias for this crate.
pub type Result<T, E = BaselineError> = std::result::Result<T, E>;

/// Lower-cased alphanumeric words, then adjacent pairs (`"a b"`).
fn terms(text: &str) -> Vec<String> {
    let words: Vec<String> = text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let pairs = words.windows(2).map(|w| format!("{} {}", w[0], w[1]));
    words.iter().cloned().chain(pairs).collect()
}

/// A fitted TF-IDF vocabulary.
#[derive(Debug, Clone)]
pub struct TfIdf {
    index: HashMap<String, usize>,
    idf: Vec<f32>,
}

impl TfIdf {
    /// Keeps terms in at least `min_df` texts, the `max_features` most frequent (ties by term).
    pub fn fit(texts: &[&str], min_df: usize, max_features: usize) -> Self {
        let mut df: HashMap<String, usize> = HashMap::new();
        for t in texts {
            let mut seen: Vec<String> = terms(t);
            seen.sort();
            seen.dedup();
            for term in seen {
                *df.entry(term).or_insert(0) += 1;
            }
        }
        let mut kept: Vec<(String, usize)> = df.into_iter().filter(|(_, c)| *c >= min_df).collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        kept.truncate(max_features);
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        let n = texts.len() as f32;
        let idf = kept
            .iter()
            .map(|(_, c)| ((1.0 + n) / (1.0 + *c as f32)).ln() + 1.0)
            .collect();
        let index = kept
            .into_iter()
            .enumerate()
            .map(|(i, (t, _))| (t, i))
            .collect();
        TfIdf { index, idf }
    }

    /// Terms in the vocabulary.
    pub fn features(&self) -> usize {
        self.idf.len()
    }

    /// Rows of L2-normalised tf-idf weights.
    pub fn transform(&self, texts: &[&str]) -> Array2<f32> {
        let mut x = Array2::<f32>::zeros((texts.len(), self.features()));
        for (r, t) in texts.iter().enumerate() {
            for (j, v) in self.sparse_row(t) {
                x[[r, j]] = v;
            }
        }
        x
    }

    /// One text's L2-normalised tf-idf weights as (term index, weight), by term index; empty when
    /// no term of the text is in the vocabulary.
    pub fn sparse_row(&self, text: &str) -> Vec<(usize, f32)> {
        let mut weights: HashMap<usize, f32> = HashMap::new();
        for term in terms(text) {
            if let Some(&j) = self.index.get(&term) {
                *weights.entry(j).or_insert(0.0) += self.idf[j];
            }
        }
        let mut row: Vec<(usize, f32)> = weights.into_iter().collect();
        row.sort_by_key(|&(j, _)| j);
        let norm = row.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|(_, v)| *v /= norm);
        }
        row
    }
}

/// TF-IDF features and a multinomial logistic regression.
pub struct TfIdfLogReg {
    /// The fitted vectorizer.
    pub tfidf: TfIdf,
    model: MultiFittedLogisticRegression<f32, usize>,
    classes: usize,
}

/// Fitting settings.
#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    /// Terms in fewer documents than this are dropped.
    pub min_df: usize,
    /// At most this many terms (the most frequent) are kept.
    pub max_features: usize,
    /// L2 penalty.
    pub alpha: f32,
    /// Iterations of the optimizer.
    pub max_iterations: u64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            min_df: 2,
            max_features: 5000,
            alpha: 1e-4,
            max_iterations: 200,
        }
    }
}

impl TfIdfLogReg {
    /// Fits on `texts` with label indices `labels` (`0..classes`).
    pub fn fit(
        texts: &[&str],
        labels: &[usize],
        classes: usize,
        options: FitOptions,
    ) -> Result<Self> {
        if texts.is_empty() || texts.len() != labels.len() {
            return Err(BaselineError::Input(format!(
                "{} texts and {} labels",
                texts.len(),
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
            return Err(BaselineError::Input(format!(
                "label index {bad} is not below the {classes} classes"
            )));
        }
        let tfidf = TfIdf::fit(texts, options.min_df, options.max_features);
        let x = tfidf.transform(texts);
        let y = Array1::from(labels.to_vec());
        let data = Dataset::new(x, y);
        let model = MultiLogisticRegression::default()
            .alpha(options.alpha)
            .max_iterations(options.max_iterations)
            .fit(&data)
            .map_err(|e| BaselineError::Fit(e.to_string()))?;
        Ok(TfIdfLogReg {
            tfidf,
            model,
            classes,
        })
    }

    /// The most probable label index of each text and its probability.
    pub fn predict(&self, texts: &[&str]) -> Vec<(usize, f64)> {
        let x = self.tfidf.transform(texts);
        let probs = self.model.predict_probabilities(&x);
        let classes = self.model.classes();
        probs
            .rows()
            .into_iter()
            .map(|row| {
                let (best, p) = row.iter().enumerate().fold((0, f32::MIN), |acc, (i, &p)| {
                    if p > acc.1 {
                        (i, p)
                    } else {
                        acc
                    }
                });
                let label = classes
                    .get(best)
                    .copied()
                    .unwrap_or(0)
                    .min(self.classes - 1);
                (label, p as f64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_separable_toy_problem() {
        let texts = [
            "i want a refund for my order",
            "refund my money please",
            "how do i get a refund",
            "cancel my order now",
            "please cancel the order",
            "i need to cancel an order",
            "change my shipping address",
            "update the shipping address please",
            "new shipping address for delivery",
        ];
        let labels = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let m = TfIdfLogReg::fit(
            &texts,
            &labels,
            3,
            FitOptions {
                min_df: 1,
                alpha: 1e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let p = m.predict(&["refund please", "cancel it", "shipping address wrong"]);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(p.iter().all(|x| x.1 > 1.0 / 3.0));
        assert!(TfIdfLogReg::fit(&texts, &labels, 2, FitOptions::default()).is_err());
        // Idf: a term in every text weighs less than a rare one; rows are unit length.
        let t = TfIdf::fit(&["a b", "a c"], 1, 100);
        let x = t.transform(&["a b"]);
        let norm: f32 = x.row(0).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
