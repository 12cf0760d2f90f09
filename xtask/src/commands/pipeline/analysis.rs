//! The report's error analysis of Task 1 (and, in [`task2`], of Task 2's replies): a table over every run (where its errors go, how
//! confident they are, how many outputs gave no label), each run's failure modes in plain sentences
//! (`supportlm_prompting::errors::failure_modes`), and for SFT and the best prompting run the
//! most-confused pairs and the most confident mistakes with their messages.

use std::fmt::Write as _;
use std::path::Path;

use supportlm_model::generate::StopReason;
use supportlm_prompting::errors::{analyse, failure_modes, ErrorAnalysis};
use supportlm_prompting::reply_errors::{
    analyse_replies, reply_failure_modes, ReplyAnalysis, ReplyItem,
};
use supportlm_prompting::report::ScoredResponse;

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

/// The Task 2 error analysis for the response runs of `runs` (folder under `t2/`, name): mean ROUGE-L
/// per category, reply length against the reference, replies cut at the budget, the failure-mode
/// sentences, and the weakest replies of the runs in `detailed`.
pub(super) fn task2(md: &mut String, t2: &Path, runs: &[(&str, &str)], detailed: &[&str]) {
    let words = |t: &str| t.split_whitespace().count();
    let analysed: Vec<(&str, &str, Vec<ScoredResponse>, ReplyAnalysis)> = runs
        .iter()
        .filter_map(|&(folder, name)| {
            let text = std::fs::read_to_string(t2.join(folder).join("predictions.jsonl")).ok()?;
            let lines: Vec<ScoredResponse> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let items: Vec<ReplyItem> = lines
                .iter()
                .map(|l| ReplyItem {
                    category: l.response.category.clone(),
                    rouge_l: l.scores.rouge_l,
                    generated_words: words(&l.response.generated),
                    reference_words: words(&l.response.reference),
                    cut: l.response.stop == StopReason::MaxTokens,
                    degenerate: l.degeneration.any(),
                })
                .collect();
            let a = analyse_replies(&items, 3);
            (!lines.is_empty()).then_some((folder, name, lines, a))
        })
        .collect();
    if analysed.is_empty() {
        return;
    }
    let _ = writeln!(md, "### Error analysis (Task 2)\n");
    let mut categories: Vec<String> = analysed
        .iter()
        .flat_map(|(_, _, _, a)| a.categories.iter().map(|c| c.category.clone()))
        .collect();
    categories.sort();
    categories.dedup();
    let mut header = vec!["category".to_string(), "items".to_string()];
    header.extend(analysed.iter().map(|(_, n, _, _)| format!("{n} ROUGE-L")));
    let rows: Vec<Vec<String>> = categories
        .iter()
        .map(|cat| {
            let mut row = vec![cat.clone()];
            let of = |a: &ReplyAnalysis| a.categories.iter().find(|c| &c.category == cat).cloned();
            row.push(of(&analysed[0].3).map_or("–".into(), |c| c.items.to_string()));
            row.extend(
                analysed.iter().map(|(_, _, _, a)| {
                    of(a).map_or("–".into(), |c| format!("{:.3}", c.rouge_l))
                }),
            );
            row
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let _ = writeln!(
        md,
        "Mean ROUGE-L per category (the category the prompt carried), then each run's replies against \
         their references:\n"
    );
    table(md, &header, &rows);
    let rows: Vec<Vec<String>> = analysed
        .iter()
        .map(|(_, name, _, a)| {
            vec![
                name.to_string(),
                a.items.to_string(),
                format!("{:.3}", a.rouge_l),
                a.categories.first().map_or("–".into(), |c| {
                    format!("{} ({:.3})", c.category, c.rouge_l)
                }),
                a.median_length_ratio
                    .map_or("–".into(), |r| format!("{r:.2}")),
                pct(a.cut_share),
                pct(a.degenerate_share),
            ]
        })
        .collect();
    table(
        md,
        &[
            "method",
            "replies",
            "mean ROUGE-L",
            "weakest category",
            "median words reply / reference",
            "cut at the budget",
            "degenerate",
        ],
        &rows,
    );
    let modes: Vec<String> = analysed
        .iter()
        .flat_map(|(_, name, _, a)| reply_failure_modes(name, a))
        .collect();
    if !modes.is_empty() {
        let _ = writeln!(md, "Failure modes, from the figures above:\n");
        for m in modes {
            let _ = writeln!(md, "- {m}");
        }
        md.push('\n');
    }
    for (folder, name, lines, a) in &analysed {
        if !detailed.contains(folder) {
            continue;
        }
        let _ = writeln!(md, "**{name}**: its weakest replies (lowest ROUGE-L)\n");
        let rows: Vec<Vec<String>> = a
            .worst
            .iter()
            .map(|&i| {
                let l = &lines[i];
                vec![
                    l.response.id.to_string(),
                    l.response.category.clone(),
                    cell(&l.response.message, 80),
                    cell(&l.response.generated, 140),
                    cell(&l.response.reference, 100),
                    format!("{:.3}", l.scores.rouge_l),
                ]
            })
            .collect();
        table(
            md,
            &[
                "item",
                "category",
                "message",
                "reply",
                "reference",
                "ROUGE-L",
            ],
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
