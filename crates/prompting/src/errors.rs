//! Error analysis of a Task 1 run: where its mistakes go (the most-confused label pairs and what
//! share of all errors they hold), which labels it loses, whether it collapses onto one label, how
//! confident its mistakes are, and how its outputs failed to give a label. [`failure_modes`] turns
//! those figures into the report's plain sentences.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::extract::{Extraction, EXTRACTION_FAILED};
use crate::Prediction;

/// One off-diagonal cell of the confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confusion {
    /// The true label.
    pub truth: String,
    /// What the run predicted instead.
    pub predicted: String,
    /// How many items.
    pub count: usize,
    /// Their share of the true label's items.
    pub share_of_truth: f64,
}

/// A label's recall and where its misses went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelMisses {
    /// The true label.
    pub label: String,
    /// Items with that label.
    pub support: usize,
    /// Of those, predicted correctly.
    pub correct: usize,
    /// The label its misses were most often given (`None` without misses).
    pub mostly_taken_for: Option<String>,
}

impl LabelMisses {
    /// Correct share of the label's items.
    pub fn recall(&self) -> f64 {
        self.correct as f64 / self.support.max(1) as f64
    }
}

/// The error analysis of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorAnalysis {
    /// Items scored.
    pub items: usize,
    /// Wrong predictions (an extraction failure counts as wrong).
    pub errors: usize,
    /// Every confused pair, most frequent first (ties by truth, then prediction).
    pub confused: Vec<Confusion>,
    /// Every true label, lowest recall first (ties by label).
    pub labels: Vec<LabelMisses>,
    /// The most predicted label, its share of all predictions and its share of the truths.
    pub dominant: Option<(String, f64, f64)>,
    /// Median confidence of the right and of the wrong predictions.
    pub median_confidence: (Option<f64>, Option<f64>),
    /// How each prediction's label was read: `(kind, items, of which wrong)`, in the enum's order.
    pub extraction: Vec<(Extraction, usize, usize)>,
    /// Wrong predictions, most confident first (ties by id).
    pub hardest: Vec<Prediction>,
}

impl ErrorAnalysis {
    /// Share of the errors held by the `k` most frequent pairs.
    pub fn top_share(&self, k: usize) -> f64 {
        let top: usize = self.confused.iter().take(k).map(|c| c.count).sum();
        top as f64 / self.errors.max(1) as f64
    }

    /// Whether the labels were chosen by scoring (confidences are label probabilities), not read
    /// from generated text (confidence 1 or 0).
    pub fn scored(&self) -> bool {
        self.extraction
            .iter()
            .any(|(k, n, _)| *k == Extraction::Scored && *n > 0)
    }

    /// Outputs no label could be read from.
    pub fn extraction_failures(&self) -> usize {
        self.extraction
            .iter()
            .filter(|(k, _, _)| *k == Extraction::Failed)
            .map(|(_, n, _)| n)
            .sum()
    }
}

/// The median (mean of the two middle values for an even count); `None` when empty.
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

const KINDS: [Extraction; 6] = [
    Extraction::Exact,
    Extraction::Normalized,
    Extraction::FirstMention,
    Extraction::EditDistance,
    Extraction::Scored,
    Extraction::Failed,
];

/// Analyses `predictions`; `hardest` caps the list of confident errors.
pub fn analyse(predictions: &[Prediction], hardest: usize) -> ErrorAnalysis {
    let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut truth_count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut truth_correct: BTreeMap<&str, usize> = BTreeMap::new();
    let mut predicted: BTreeMap<&str, usize> = BTreeMap::new();
    for p in predictions {
        *truth_count.entry(&p.truth).or_default() += 1;
        *predicted.entry(&p.prediction).or_default() += 1;
        if p.correct() {
            *truth_correct.entry(&p.truth).or_default() += 1;
        } else {
            *pairs.entry((&p.truth, &p.prediction)).or_default() += 1;
        }
    }
    let mut confused: Vec<Confusion> = pairs
        .iter()
        .map(|(&(t, p), &count)| Confusion {
            truth: t.to_string(),
            predicted: p.to_string(),
            count,
            share_of_truth: count as f64 / truth_count[t] as f64,
        })
        .collect();
    // Stable sort over the map's (truth, prediction) order: ties keep it.
    confused.sort_by_key(|c| std::cmp::Reverse(c.count));

    let mut labels: Vec<LabelMisses> = truth_count
        .iter()
        .map(|(&label, &support)| LabelMisses {
            label: label.to_string(),
            support,
            correct: truth_correct.get(label).copied().unwrap_or(0),
            mostly_taken_for: confused
                .iter()
                .find(|c| c.truth == label)
                .map(|c| c.predicted.clone()),
        })
        .collect();
    labels.sort_by(|a, b| a.recall().total_cmp(&b.recall()));

    let n = predictions.len();
    let dominant = predicted
        .iter()
        // Highest count; the first label in order among ties (max_by keeps the last, so compare reversed).
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(&label, &count)| {
            let truths = truth_count.get(label).copied().unwrap_or(0);
            (
                label.to_string(),
                count as f64 / n as f64,
                truths as f64 / n as f64,
            )
        });

    let conf = |right: bool| {
        median(
            predictions
                .iter()
                .filter(|p| p.correct() == right)
                .map(|p| p.confidence)
                .collect(),
        )
    };
    let extraction = KINDS
        .iter()
        .map(|&k| {
            let of: Vec<&Prediction> = predictions.iter().filter(|p| p.extraction == k).collect();
            (k, of.len(), of.iter().filter(|p| !p.correct()).count())
        })
        .filter(|&(_, n, _)| n > 0)
        .collect();
    ErrorAnalysis {
        items: n,
        errors: predictions.iter().filter(|p| !p.correct()).count(),
        confused,
        labels,
        dominant,
        median_confidence: (conf(true), conf(false)),
        extraction,
        hardest: most_confident_errors(predictions, hardest),
    }
}

/// The `n` wrong predictions with the highest confidence (ties by id).
pub fn most_confident_errors(predictions: &[Prediction], n: usize) -> Vec<Prediction> {
    let mut wrong: Vec<&Prediction> = predictions.iter().filter(|p| !p.correct()).collect();
    wrong.sort_by(|a, b| b.confidence.total_cmp(&a.confidence).then(a.id.cmp(&b.id)));
    wrong.into_iter().take(n).cloned().collect()
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The run's failure modes in a few sentences, each stated only when the figures show it: errors
/// concentrated on a few pairs or spread out, a collapse onto one label, the weakest labels,
/// confident errors (constrained scores) and outputs without a label.
pub fn failure_modes(name: &str, a: &ErrorAnalysis) -> Vec<String> {
    let mut out = Vec::new();
    if a.items == 0 {
        return out;
    }
    if a.errors == 0 {
        out.push(format!("{name} got all {} items right.", a.items));
        return out;
    }
    let top = |k: usize| {
        a.confused
            .iter()
            .take(k)
            .map(|c| format!("{} → {} ({})", c.truth, c.predicted, c.count))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let share3 = a.top_share(3);
    let mut first = format!(
        "{name} is wrong on {} of {} items ({}).",
        a.errors,
        a.items,
        pct(a.errors as f64 / a.items as f64)
    );
    if let Some((label, share, truth_share)) = &a.dominant {
        if label == EXTRACTION_FAILED && *share >= 0.4 {
            first += &format!(
                " Most of its outputs ({}) name no label at all: the model answers the message \
                 instead of classifying it.",
                pct(*share)
            );
        } else if *share >= 0.4 && *share >= 2.0 * truth_share {
            first += &format!(
                " It collapses onto one label: {label} takes {} of all predictions against {} of the \
                 truths, so most errors are that label's false positives rather than confusions \
                 between neighbours.",
                pct(*share),
                pct(*truth_share)
            );
        }
    }
    out.push(first);
    if a.confused.len() <= 3 {
        out.push(format!(
            "All its errors fall on {} label pair{}: {}.",
            a.confused.len(),
            if a.confused.len() == 1 { "" } else { "s" },
            top(3)
        ));
    } else if share3 >= 0.5 {
        out.push(format!(
            "Its errors are concentrated: the three most frequent confusions hold {} of them: {}.",
            pct(share3),
            top(3)
        ));
    } else {
        out.push(format!(
            "Its errors are spread over {} label pairs (the three most frequent hold {}): {}.",
            a.confused.len(),
            pct(share3),
            top(3)
        ));
    }
    let weak: Vec<String> = a
        .labels
        .iter()
        .take(3)
        .filter(|l| l.correct < l.support)
        .map(|l| {
            let mut s = format!(
                "{} {} ({}/{})",
                l.label,
                pct(l.recall()),
                l.correct,
                l.support
            );
            if let Some(p) = &l.mostly_taken_for {
                s += &format!(", mostly taken for {p}");
            }
            s
        })
        .collect();
    if !weak.is_empty() {
        out.push(format!("Lowest recall: {}.", weak.join("; ")));
    }
    if let (true, (Some(right), Some(wrong))) = (a.scored(), a.median_confidence) {
        out.push(if wrong >= 0.8 {
            format!(
                "Its mistakes are confident (median probability of the wrong label {wrong:.2}, \
                 {right:.2} when right): a threshold on confidence would not catch them."
            )
        } else if right - wrong >= 0.2 {
            format!(
                "Its mistakes are less confident than its right answers (median {wrong:.2} vs \
                 {right:.2}): a confidence threshold separates many of them."
            )
        } else {
            format!(
                "Confidence barely separates its mistakes from its right answers (median {wrong:.2} \
                 vs {right:.2})."
            )
        });
    }
    let failed = a.extraction_failures();
    if failed > 0 {
        let fuzzy: usize = a
            .extraction
            .iter()
            .filter(|(k, _, _)| matches!(k, Extraction::FirstMention | Extraction::EditDistance))
            .map(|(_, n, _)| n)
            .sum();
        out.push(format!(
            "{failed} output{} ({}) named no label at all and count as errors; {fuzzy} more were \
             read only by first mention or edit distance.",
            if failed == 1 { "" } else { "s" },
            pct(failed as f64 / a.items as f64)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: usize, truth: &str, prediction: &str, confidence: f64, e: Extraction) -> Prediction {
        Prediction {
            id,
            message: format!("message {id}"),
            truth: truth.into(),
            prediction: prediction.into(),
            raw: prediction.into(),
            confidence,
            extraction: e,
        }
    }

    /// Ten items by hand: A 4 (3 right, 1 → B), B 4 (1 right, 3 → A), C 2 (0 right, 1 → A, 1 failed).
    fn sample() -> Vec<Prediction> {
        use Extraction::*;
        vec![
            p(0, "A", "A", 0.9, Scored),
            p(1, "A", "A", 0.8, Scored),
            p(2, "A", "A", 0.7, Scored),
            p(3, "A", "B", 0.6, Scored),
            p(4, "B", "B", 0.9, Scored),
            p(5, "B", "A", 0.95, Scored),
            p(6, "B", "A", 0.5, Scored),
            p(7, "B", "A", 0.95, Scored),
            p(8, "C", "A", 0.4, Scored),
            p(9, "C", "EXTRACTION_FAILED", 0.0, Failed),
        ]
    }

    #[test]
    fn hand_computed_analysis() {
        let a = analyse(&sample(), 3);
        assert_eq!((a.items, a.errors), (10, 6));
        let pairs: Vec<(&str, &str, usize)> = a
            .confused
            .iter()
            .map(|c| (c.truth.as_str(), c.predicted.as_str(), c.count))
            .collect();
        assert_eq!(
            pairs,
            [
                ("B", "A", 3),
                ("A", "B", 1),
                ("C", "A", 1),
                ("C", "EXTRACTION_FAILED", 1)
            ]
        );
        assert_eq!(a.confused[0].share_of_truth, 0.75);
        assert_eq!(a.top_share(1), 0.5);
        let recalls: Vec<(&str, usize, usize, Option<&str>)> = a
            .labels
            .iter()
            .map(|l| {
                (
                    l.label.as_str(),
                    l.correct,
                    l.support,
                    l.mostly_taken_for.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            recalls,
            [
                ("C", 0, 2, Some("A")),
                ("B", 1, 4, Some("A")),
                ("A", 3, 4, Some("B"))
            ]
        );
        // A is predicted 7 times of 10; 4 truths.
        assert_eq!(a.dominant, Some(("A".into(), 0.7, 0.4)));
        // Right: 0.9 0.8 0.7 0.9 → median 0.85; wrong: 0.6 0.95 0.5 0.95 0.4 0.0 → (0.5 + 0.6) / 2.
        let (right, wrong) = a.median_confidence;
        assert!((right.unwrap() - 0.85).abs() < 1e-12 && (wrong.unwrap() - 0.55).abs() < 1e-12);
        assert_eq!(
            a.extraction,
            [(Extraction::Scored, 9, 5), (Extraction::Failed, 1, 1)]
        );
        assert_eq!(a.extraction_failures(), 1);
        // Ties at 0.95 by id.
        let ids: Vec<usize> = a.hardest.iter().map(|p| p.id).collect();
        assert_eq!(ids, [5, 7, 3]);
    }

    #[test]
    fn sentences_follow_the_figures() {
        let s = failure_modes("M", &analyse(&sample(), 3));
        assert_eq!(s[0], "M is wrong on 6 of 10 items (60.0%).");
        // Top three pairs hold 5 of 6 errors.
        assert!(s[1].starts_with(
            "Its errors are concentrated: the three most frequent confusions hold 83.3%"
        ));
        assert!(s[1].ends_with("B → A (3), A → B (1), C → A (1)."));
        assert_eq!(
            s[2],
            "Lowest recall: C 0.0% (0/2), mostly taken for A; B 25.0% (1/4), mostly taken for A; \
             A 75.0% (3/4), mostly taken for B."
        );
        assert!(s[3].starts_with(
            "Its mistakes are less confident than its right answers (median 0.55 vs 0.85)"
        ));
        assert!(s[4].starts_with("1 output (10.0%) named no label"));

        // A collapse: 9 of 10 predicted X, X is 1 truth of 10.
        let collapsed: Vec<Prediction> = (0..10)
            .map(|i| {
                let t = if i == 0 { "X" } else { "Y" };
                let pr = if i == 9 { "Y" } else { "X" };
                p(i, t, pr, 0.99, Extraction::Scored)
            })
            .collect();
        let s = failure_modes("Z", &analyse(&collapsed, 0));
        assert!(s[0].contains(
            "It collapses onto one label: X takes 90.0% of all predictions against 10.0%"
        ));
        assert_eq!(s[1], "All its errors fall on 1 label pair: Y → X (8).");
        assert!(s
            .iter()
            .any(|l| l.starts_with("Its mistakes are confident")));

        // Generated outputs that mostly name no label.
        let unread: Vec<Prediction> = (0..4)
            .map(|i| match i {
                0 => p(i, "A", "A", 1.0, Extraction::Exact),
                _ => p(i, "A", EXTRACTION_FAILED, 0.0, Extraction::Failed),
            })
            .collect();
        let a = analyse(&unread, 0);
        assert!(!a.scored());
        let s = failure_modes("G", &a);
        assert!(s[0].ends_with("Most of its outputs (75.0%) name no label at all: the model answers the message instead of classifying it."));
        assert!(!s.iter().any(|l| l.contains("confiden")));

        let perfect = vec![p(0, "A", "A", 1.0, Extraction::Exact)];
        assert_eq!(
            failure_modes("P", &analyse(&perfect, 1)),
            ["P got all 1 items right."]
        );
        assert!(failure_modes("E", &analyse(&[], 1)).is_empty());
    }
}
