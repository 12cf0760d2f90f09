//! Error analysis of a Task 2 run: which categories its replies match the references worst in, how
//! long its replies are against the references, how many were cut at the token budget, and its
//! weakest replies. [`reply_failure_modes`] turns those figures into the report's plain sentences.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::errors::median;

/// What the analysis reads of one scored reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyItem {
    /// The category the reply was written for.
    pub category: String,
    /// ROUGE-L F of the reply against the reference.
    pub rouge_l: f64,
    /// Words in the reply.
    pub generated_words: usize,
    /// Words in the reference.
    pub reference_words: usize,
    /// Generation stopped at the token budget.
    pub cut: bool,
    /// Empty, looping or leaking the prompt.
    pub degenerate: bool,
}

/// One category's replies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryScore {
    /// The category.
    pub category: String,
    /// Its replies.
    pub items: usize,
    /// Mean ROUGE-L F.
    pub rouge_l: f64,
}

/// The analysis of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyAnalysis {
    /// Replies analysed.
    pub items: usize,
    /// Mean ROUGE-L F over every item.
    pub rouge_l: f64,
    /// Per category, lowest mean ROUGE-L first (ties by name).
    pub categories: Vec<CategoryScore>,
    /// Median of reply words over reference words (items with a non-empty reference).
    pub median_length_ratio: Option<f64>,
    /// Share of replies cut at the token budget.
    pub cut_share: f64,
    /// Share of degenerate replies.
    pub degenerate_share: f64,
    /// Indices of the `worst` lowest-ROUGE-L items, lowest first (ties by index).
    pub worst: Vec<usize>,
}

/// The mean of `v` (0 when empty).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Analyses `items`; `worst` is how many of the weakest replies to name.
pub fn analyse_replies(items: &[ReplyItem], worst: usize) -> ReplyAnalysis {
    let n = items.len();
    let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for it in items {
        by.entry(&it.category).or_default().push(it.rouge_l);
    }
    let mut categories: Vec<CategoryScore> = by
        .into_iter()
        .map(|(c, v)| CategoryScore {
            category: c.to_string(),
            items: v.len(),
            rouge_l: mean(&v),
        })
        .collect();
    categories.sort_by(|a, b| {
        a.rouge_l
            .total_cmp(&b.rouge_l)
            .then(a.category.cmp(&b.category))
    });
    let median_length_ratio = median(
        items
            .iter()
            .filter(|i| i.reference_words > 0)
            .map(|i| i.generated_words as f64 / i.reference_words as f64)
            .collect(),
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        items[a]
            .rouge_l
            .total_cmp(&items[b].rouge_l)
            .then(a.cmp(&b))
    });
    order.truncate(worst);
    ReplyAnalysis {
        items: n,
        rouge_l: mean(&items.iter().map(|i| i.rouge_l).collect::<Vec<_>>()),
        categories,
        median_length_ratio,
        cut_share: items.iter().filter(|i| i.cut).count() as f64 / n.max(1) as f64,
        degenerate_share: items.iter().filter(|i| i.degenerate).count() as f64 / n.max(1) as f64,
        worst: order,
    }
}

/// The run's failure modes in sentences, each stated only when the figures show it: a category well
/// below the run's mean (≥ 20% lower, with at least 3 items), replies much shorter or longer than
/// the references (median ratio below 0.6 or above 1.6), many replies cut at the budget (≥ 20%), any
/// degenerate replies.
pub fn reply_failure_modes(name: &str, a: &ReplyAnalysis) -> Vec<String> {
    let mut out = Vec::new();
    if a.items == 0 {
        return out;
    }
    if let Some(c) = a.categories.first() {
        if c.items >= 3 && a.rouge_l > 0.0 && c.rouge_l <= 0.8 * a.rouge_l {
            out.push(format!(
                "{name}: its replies match the references least for {} (mean ROUGE-L {:.3} over {} items, \
                 against {:.3} overall).",
                c.category, c.rouge_l, c.items, a.rouge_l
            ));
        }
    }
    if let Some(r) = a.median_length_ratio {
        if r < 0.6 {
            out.push(format!(
                "{name}: replies are short: the median reply has {:.0}% of its reference's words.",
                100.0 * r
            ));
        } else if r > 1.6 {
            out.push(format!(
                "{name}: replies are long: the median reply has {:.1}× its reference's words.",
                r
            ));
        }
    }
    if a.cut_share >= 0.2 {
        out.push(format!(
            "{name}: {:.0}% of the replies ran into the token budget (cut mid-reply).",
            100.0 * a.cut_share
        ));
    }
    if a.degenerate_share > 0.0 {
        out.push(format!(
            "{name}: {:.1}% of the replies are degenerate (empty, looping or leaking the prompt).",
            100.0 * a.degenerate_share
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(category: &str, rouge_l: f64, words: (usize, usize), cut: bool) -> ReplyItem {
        ReplyItem {
            category: category.into(),
            rouge_l,
            generated_words: words.0,
            reference_words: words.1,
            cut,
            degenerate: false,
        }
    }

    #[test]
    fn categories_worst_items_and_lengths_by_hand() {
        let items = [
            item("REFUND", 0.30, (50, 100), false),
            item("ORDER", 0.10, (20, 100), true),
            item("REFUND", 0.40, (90, 100), false),
            item("ORDER", 0.20, (30, 0), false),
        ];
        let a = analyse_replies(&items, 2);
        assert_eq!(a.items, 4);
        assert!((a.rouge_l - 0.25).abs() < 1e-12);
        assert_eq!(a.categories[0].category, "ORDER");
        assert!((a.categories[0].rouge_l - 0.15).abs() < 1e-12);
        assert!((a.categories[1].rouge_l - 0.35).abs() < 1e-12);
        // Ratios 0.5, 0.2, 0.9 (the empty reference left out): median 0.5.
        assert_eq!(a.median_length_ratio, Some(0.5));
        assert_eq!(a.cut_share, 0.25);
        assert_eq!(a.worst, [1, 3]);
    }

    #[test]
    fn sentences_only_for_what_the_figures_show() {
        let even: Vec<ReplyItem> = (0..6)
            .map(|i| item(if i % 2 == 0 { "A" } else { "B" }, 0.3, (100, 100), false))
            .collect();
        assert!(reply_failure_modes("SFT", &analyse_replies(&even, 1)).is_empty());
        let mut weak = even.clone();
        for it in weak.iter_mut().filter(|i| i.category == "A") {
            it.rouge_l = 0.1;
            it.cut = true;
            it.generated_words = 20;
        }
        // A: mean 0.1 against 0.2 overall; half the replies cut. Ratios 0.2 (three times) and 1
        // (three times): median (0.2 + 1) / 2 = 0.6, not below the threshold, so no length sentence.
        let s = reply_failure_modes("SFT", &analyse_replies(&weak, 1));
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(
            s[0].contains("least for A") && s[0].contains("0.100"),
            "{s:?}"
        );
        assert!(
            s[1].contains("50% of the replies ran into the token budget"),
            "{s:?}"
        );
        weak[1].generated_words = 10;
        weak[1].degenerate = true;
        let s = reply_failure_modes("SFT", &analyse_replies(&weak, 1));
        assert!(
            s.iter()
                .any(|x| x.contains("short: the median reply has 20%")),
            "{s:?}"
        );
        assert!(
            s.iter()
                .any(|x| x.contains("16.7% of the replies are degenerate")),
            "{s:?}"
        );
    }
}
