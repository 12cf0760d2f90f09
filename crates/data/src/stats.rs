//! Label counts and length distributions of a set of records.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::load::Record;

/// Summary of a distribution of lengths (in words).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthStats {
    /// Values counted.
    pub count: usize,
    /// Smallest.
    pub min: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: usize,
    /// 90th percentile.
    pub p90: usize,
    /// 99th percentile.
    pub p99: usize,
    /// Largest.
    pub max: usize,
}

impl LengthStats {
    /// Nearest-rank percentiles over the given lengths; `None` when there are none.
    pub fn of(mut lengths: Vec<usize>) -> Option<Self> {
        if lengths.is_empty() {
            return None;
        }
        lengths.sort_unstable();
        let n = lengths.len();
        let rank = |p: f64| lengths[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(LengthStats {
            count: n,
            min: lengths[0],
            mean: lengths.iter().sum::<usize>() as f64 / n as f64,
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: lengths[n - 1],
        })
    }
}

/// Counts per label and length distributions.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Rows in the file.
    pub rows: usize,
    /// Rows whose response is known.
    pub rows_with_response: usize,
    /// Rows whose flags are known.
    pub rows_with_flags: usize,
    /// Rows per category.
    pub categories: BTreeMap<String, usize>,
    /// Rows per intent.
    pub intents: BTreeMap<String, usize>,
    /// Words per customer message.
    pub message_words: Option<LengthStats>,
    /// Words per known response.
    pub response_words: Option<LengthStats>,
}

/// Computes [`Stats`] for some records.
pub fn stats(records: &[Record]) -> Stats {
    let mut categories = BTreeMap::new();
    let mut intents = BTreeMap::new();
    for r in records {
        *categories.entry(r.category.to_string()).or_insert(0) += 1;
        *intents.entry(r.intent.to_string()).or_insert(0) += 1;
    }
    let words = |s: &str| s.split_whitespace().count();
    Stats {
        rows: records.len(),
        rows_with_response: records.iter().filter(|r| r.response.is_some()).count(),
        rows_with_flags: records.iter().filter(|r| r.flags.is_some()).count(),
        categories,
        intents,
        message_words: LengthStats::of(records.iter().map(|r| words(&r.instruction)).collect()),
        response_words: LengthStats::of(
            records
                .iter()
                .filter_map(|r| r.response.as_deref())
                .map(words)
                .collect(),
        ),
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rows: {}  (response known: {}, flags known: {})",
            self.rows, self.rows_with_response, self.rows_with_flags
        )?;
        for (title, counts) in [("category", &self.categories), ("intent", &self.intents)] {
            writeln!(f, "\n{:<26} {:>6} {:>7}", title, "rows", "share")?;
            for (label, n) in counts {
                let share = 100.0 * *n as f64 / self.rows.max(1) as f64;
                writeln!(f, "{label:<26} {n:>6} {share:>6.2}%")?;
            }
        }
        writeln!(
            f,
            "\n{:<18} {:>6} {:>4} {:>7} {:>4} {:>4} {:>4} {:>4}",
            "words per", "count", "min", "mean", "p50", "p90", "p99", "max"
        )?;
        for (name, s) in [
            ("message", &self.message_words),
            ("response", &self.response_words),
        ] {
            if let Some(s) = s {
                writeln!(
                    f,
                    "{name:<18} {:>6} {:>4} {:>7.1} {:>4} {:>4} {:>4} {:>4}",
                    s.count, s.min, s.mean, s.p50, s.p90, s.p99, s.max
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = LengthStats::of((1..=100).collect()).unwrap();
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1, 50, 90, 99, 100));
        assert_eq!(s.mean, 50.5);
        assert!(LengthStats::of(vec![]).is_none());
    }
}
