//! The report's error analysis of Task 1: a table over every run (where its errors go, how
//! confident they are, how many outputs gave no label), each run's failure modes in plain sentences
//! (`supportlm_prompting::errors::failure_modes`), and for SFT and the best prompting run the
//! most-confused pairs and the most confident mistakes with their messages.

use std::fmt::Write as _;
use std::path::Path;

use supportlm_prompting::errors::{analyse, failure_modes, ErrorAnalysis};

use super::tables::{predictions, table};

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn conf(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.2}"))
}

/// A message as one Markdown table cell, cut at `max` characters.
fn cell(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| match c {
            '|' => '/',
            c if c.is_whitespace() => ' ',
            c => c,
        })
        .collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// Writes the section for the runs of `runs` (folder under `t1/`, name) that have predictions; the
/// detailed tables go to `detailed` (folders) and to the prompting run with the fewest errors.
pub(super) fn task1(md: &mut String, t1: &Path, runs: &[(&str, &str)], detailed: &[&str]) {
    let analysed: Vec<(&str, &str, ErrorAnalysis)> = runs
        .iter()
        .filter_map(|&(folder, name)| {
            let p = predictions(&t1.join(folder))?;
            Some((folder, name, analyse(&p, 5)))
        })
        .collect();
    if analysed.is_empty() {
        return;
    }
    let _ = writeln!(md, "### Error analysis\n");
    let rows: Vec<Vec<String>> = analysed
        .iter()
        .map(|(_, name, a)| {
            let top = a.confused.first().map_or("–".into(), |c| {
                format!(
                    "{} → {} ({}, {} of {})",
                    c.truth,
                    c.predicted,
                    c.count,
                    pct(c.share_of_truth),
                    c.truth
                )
            });
            let dominant = a.dominant.as_ref().map_or("–".into(), |(l, s, t)| {
                format!("{l} {} (truth {})", pct(*s), pct(*t))
            });
            vec![
                name.to_string(),
                format!("{} / {}", a.errors, a.items),
                top,
                pct(a.top_share(3)),
                dominant,
                if a.scored() {
                    format!(
                        "{} / {}",
                        conf(a.median_confidence.0),
                        conf(a.median_confidence.1)
                    )
                } else {
                    "– (generated)".into()
                },
                a.extraction_failures().to_string(),
            ]
        })
        .collect();
    table(
        md,
        &[
            "method",
            "errors",
            "most frequent confusion",
            "top-3 pairs' share of errors",
            "most predicted label",
            "median confidence right / wrong",
            "no label",
        ],
        &rows,
    );
    let _ = writeln!(md, "Failure modes, from the figures above:\n");
    for (_, name, a) in &analysed {
        let _ = writeln!(md, "- {}", failure_modes(name, a).join(" "));
    }
    md.push('\n');

    // The best prompting run: fewest errors among the runs that are not SFT or TF-IDF.
    let best_prompting = analysed
        .iter()
        .filter(|(f, _, _)| f.starts_with("zero-shot") || f.starts_with("few-shot"))
        .min_by_key(|(_, _, a)| a.errors)
        .map(|(f, _, _)| *f);
    for (folder, name, a) in &analysed {
        if !(detailed.contains(folder) || best_prompting == Some(*folder)) || a.errors == 0 {
            continue;
        }
        let _ = writeln!(md, "**{name}**: the most confused pairs\n");
        let rows: Vec<Vec<String>> = a
            .confused
            .iter()
            .take(8)
            .map(|c| {
                vec![
                    c.truth.clone(),
                    c.predicted.clone(),
                    c.count.to_string(),
                    pct(c.share_of_truth),
                    pct(c.count as f64 / a.errors as f64),
                ]
            })
            .collect();
        table(
            md,
            &[
                "true label",
                "predicted",
                "items",
                "share of the true label",
                "share of all errors",
            ],
            &rows,
        );
        let _ = writeln!(md, "**{name}**: its most confident mistakes\n");
        let rows: Vec<Vec<String>> = a
            .hardest
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    cell(&p.message, 110),
                    p.truth.clone(),
                    p.prediction.clone(),
                    format!("{:.3}", p.confidence),
                ]
            })
            .collect();
        table(
            md,
            &["item", "message", "truth", "prediction", "confidence"],
            &rows,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_stay_in_their_column() {
        assert_eq!(cell("a|b\nc", 10), "a/b c");
        assert_eq!(cell("abcdef", 3), "abc…");
    }
}
