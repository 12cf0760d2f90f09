//! Reading a label out of a model's free-text answer. Rules, in order:
//! 1. exact: the trimmed answer is a label;
//! 2. normalised: equal after lowercasing and dropping everything but letters and digits
//!    (`"Refund."`, `"cancel order"` for `cancel_order`);
//! 3. first mention: the label whose normalised form occurs earliest in the normalised answer
//!    (longest first on ties, so `check_refund_policy` wins over `refund`… as a word);
//! 4. nearest: the label within a small edit distance of the answer's first word
//!    (at most a third of the label's length, at least 1);
//!    otherwise [`EXTRACTION_FAILED`].

use serde::{Deserialize, Serialize};

/// What a failed extraction predicts (counted wrong).
pub const EXTRACTION_FAILED: &str = "EXTRACTION_FAILED";

/// Which rule found the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// The output is exactly a label.
    Exact,
    /// A label after normalising case, punctuation and spacing.
    Normalized,
    /// The first label mentioned in the output.
    FirstMention,
    /// The label nearest by edit distance (within a bound).
    EditDistance,
    /// No label could be read.
    Failed,
    /// Not extracted: the label was chosen by scoring.
    Scored,
}

fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Words of `s`: lowercase runs of letters/digits, underscores and spaces removed inside labels.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The label in `answer` and how it was found (`EXTRACTION_FAILED`, `Failed` when none).
pub fn extract_label<'a>(answer: &str, labels: &[&'a str]) -> (&'a str, Extraction) {
    let trimmed = answer.trim();
    if let Some(l) = labels.iter().find(|l| **l == trimmed) {
        return (l, Extraction::Exact);
    }
    let norm = normalize(trimmed);
    if norm.is_empty() {
        return (EXTRACTION_FAILED, Extraction::Failed);
    }
    if let Some(l) = labels.iter().find(|l| normalize(l) == norm) {
        return (l, Extraction::Normalized);
    }
    let mut best: Option<(usize, usize, &str)> = None;
    for l in labels {
        if let Some(pos) = norm.find(&normalize(l)) {
            let key = (pos, usize::MAX - l.len());
            if best.is_none_or(|(p, len, _)| key < (p, len)) {
                best = Some((key.0, key.1, l));
            }
        }
    }
    if let Some((_, _, l)) = best {
        return (l, Extraction::FirstMention);
    }
    if let Some(first) = words(trimmed).first() {
        let first = normalize(first);
        let mut nearest: Option<(usize, &str)> = None;
        for l in labels {
            let nl = normalize(l);
            let d = edit_distance(&first, &nl);
            if d <= (nl.chars().count() / 3).max(1) && nearest.is_none_or(|(bd, _)| d < bd) {
                nearest = Some((d, l));
            }
        }
        if let Some((_, l)) = nearest {
            return (l, Extraction::EditDistance);
        }
    }
    (EXTRACTION_FAILED, Extraction::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATS: [&str; 4] = ["ORDER", "REFUND", "SHIPPING", "SUBSCRIPTION"];
    const INTENTS: [&str; 3] = ["cancel_order", "get_refund", "track_refund"];

    #[test]
    fn each_rule() {
        assert_eq!(
            extract_label("REFUND", &CATS),
            ("REFUND", Extraction::Exact)
        );
        assert_eq!(
            extract_label("  refund.\n", &CATS),
            ("REFUND", Extraction::Normalized)
        );
        assert_eq!(
            extract_label("Cancel Order", &INTENTS),
            ("cancel_order", Extraction::Normalized)
        );
        assert_eq!(
            extract_label("The category is SHIPPING, not ORDER", &CATS),
            ("SHIPPING", Extraction::FirstMention)
        );
        assert_eq!(
            extract_label("I think track_refund", &INTENTS),
            ("track_refund", Extraction::FirstMention)
        );
        assert_eq!(
            extract_label("Refnud", &CATS),
            ("REFUND", Extraction::EditDistance)
        );
        assert_eq!(
            extract_label("SUBSCRIPTON please", &CATS),
            ("SUBSCRIPTION", Extraction::EditDistance)
        );
    }

    #[test]
    fn failures() {
        assert_eq!(
            extract_label("", &CATS),
            (EXTRACTION_FAILED, Extraction::Failed)
        );
        assert_eq!(
            extract_label("I can help you with that!", &CATS),
            (EXTRACTION_FAILED, Extraction::Failed)
        );
        assert_eq!(
            extract_label("xyz", &CATS),
            (EXTRACTION_FAILED, Extraction::Failed)
        );
    }
}
