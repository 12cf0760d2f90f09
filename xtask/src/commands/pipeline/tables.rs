//! The helpers the report's sections share: reading run files, formatting intervals, Markdown
//! tables, per-item correctness and McNemar tables.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::de::DeserializeOwned;
use supportlm_metrics::{mcnemar, Interval, McNemar};
use supportlm_prompting::Prediction;

/// A run file read through the type its writer serializes; `None` when absent or unreadable (that
/// step has not run, or ran with an older format: the report leaves its row out).
pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!(
                "[report] {} is not readable ({e}): left out",
                path.display()
            );
            None
        }
    }
}

pub(super) fn interval(v: Option<&Interval>) -> String {
    match v {
        Some(i) => format!("{:.4} [{:.4}, {:.4}]", i.estimate, i.low, i.high),
        None => "–".into(),
    }
}

pub(super) fn table(md: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for r in rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    md.push('\n');
}

/// McNemar's test of two runs on the items both scored, with how many those are.
pub(super) fn paired_mcnemar(a: &HashMap<u64, bool>, b: &HashMap<u64, bool>) -> (usize, McNemar) {
    let mut ids: Vec<u64> = a.keys().filter(|k| b.contains_key(k)).copied().collect();
    ids.sort_unstable();
    let xa: Vec<bool> = ids.iter().map(|k| a[k]).collect();
    let xb: Vec<bool> = ids.iter().map(|k| b[k]).collect();
    (ids.len(), mcnemar(&xa, &xb))
}

/// McNemar's test for every pair of runs, on the items both scored.
pub(super) fn mcnemar_table(md: &mut String, correct: &[(&str, HashMap<u64, bool>)]) {
    let mut rows = Vec::new();
    for i in 0..correct.len() {
        for j in i + 1..correct.len() {
            let (a, ca) = &correct[i];
            let (bn, cb) = &correct[j];
            let (items, t) = paired_mcnemar(ca, cb);
            rows.push(vec![
                format!("{a} vs {bn}"),
                items.to_string(),
                t.a_only.to_string(),
                t.b_only.to_string(),
                p_value(t.exact_p, 3),
                p_value(t.chi2_p, 3),
            ]);
        }
    }
    table(
        md,
        &[
            "pair (a vs b)",
            "items",
            "only a right",
            "only b right",
            "exact p",
            "chi-square p",
        ],
        &rows,
    );
}

/// A Task 1 run's predictions (`predictions.jsonl`); `None` when the run has none.
pub(super) fn predictions(dir: &Path) -> Option<Vec<Prediction>> {
    let text = std::fs::read_to_string(dir.join("predictions.jsonl")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| serde_json::from_str::<Prediction>(l).ok())
            .collect(),
    )
}

/// Which items each Task 1 run got right.
pub(super) fn correctness(dir: &Path) -> Option<HashMap<u64, bool>> {
    Some(
        predictions(dir)?
            .iter()
            .map(|p| (p.id as u64, p.truth == p.prediction))
            .collect(),
    )
}

/// A p-value in scientific notation; one that underflowed an f64 (McNemar on thousands of paired
/// items) as `< 1e-300` rather than a misleading `0.000e0`.
pub fn p_value(p: f64, digits: usize) -> String {
    if p < 1e-300 {
        "< 1e-300".into()
    } else {
        format!("{p:.digits$e}")
    }
}

/// `p = 3.1e-15`, or `p < 1e-300`.
pub fn p_is(p: f64) -> String {
    let v = p_value(p, 1);
    if v.starts_with('<') {
        format!("p {v}")
    } else {
        format!("p = {v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_values_that_underflow_are_bounded_not_zero() {
        assert_eq!(p_value(3.14e-15, 1), "3.1e-15");
        assert_eq!(p_value(0.0, 3), "< 1e-300");
        assert_eq!(p_is(0.0), "p < 1e-300");
        assert_eq!(p_is(0.042), "p = 4.2e-2");
    }
}
