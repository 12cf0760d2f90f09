//! The report's opening: the answer first. One headline table of both tasks per method (Task 1 with
//! the method's better decision rule, Task 2 ROUGE-L and embedding cosine, Task 1 on the hand-written
//! out-of-distribution messages), one chart of macro-F1 and ROUGE-L with their intervals, and a few
//! sentences computed from the same files.

use std::fmt::Write as _;
use std::path::Path;

use supportlm_metrics::Interval;
use supportlm_prompting::report::{ClassifyMetrics, RespondRunMetrics};

use super::tables::{correctness, interval, paired_mcnemar, read_json, table};

/// A method of the study: its name, its Task 1 runs (folders under `t1/` and `t1-ood/`, by rule),
/// and its Task 2 run (folder under `t2/`).
struct MethodRuns {
    name: &'static str,
    t1: &'static [(&'static str, &'static str)],
    t2: Option<&'static str>,
}

/// The classical baselines' row.
const TFIDF: &str = "TF-IDF (Task 1: LR; Task 2: nearest reply)";

const METHODS: [MethodRuns; 4] = [
    // Task 1: logistic regression on TF-IDF features; Task 2: the reply of the nearest training
    // message of the same category.
    MethodRuns {
        name: TFIDF,
        t1: &[("tfidf", "-")],
        t2: Some("retrieval"),
    },
    MethodRuns {
        name: "0-shot",
        t1: &[
            ("zero-shot-constrained", "constrained"),
            ("zero-shot-calibrated", "calibrated"),
        ],
        t2: Some("zero-shot"),
    },
    MethodRuns {
        name: "10-shot",
        t1: &[
            ("few-shot-constrained", "constrained"),
            ("few-shot-calibrated", "calibrated"),
        ],
        t2: Some("few-shot"),
    },
    MethodRuns {
        name: "SFT (QLoRA)",
        t1: &[("sft-constrained", "constrained")],
        t2: Some("sft"),
    },
];

/// One method's headline figures.
struct Headline {
    name: &'static str,
    /// Folder and rule of its better Task 1 run, with that run's metrics.
    t1: Option<(&'static str, &'static str, ClassifyMetrics)>,
    ood: Option<Interval>,
    rouge_l: Option<Interval>,
    cosine: Option<Interval>,
}

fn headlines(d: &Path) -> Vec<Headline> {
    METHODS
        .iter()
        .map(|m| {
            let t1 =
                m.t1.iter()
                    .filter_map(|&(folder, rule)| {
                        let metrics = read_json::<ClassifyMetrics>(
                            &d.join("t1").join(folder).join("metrics.json"),
                        )?;
                        Some((folder, rule, metrics))
                    })
                    .max_by(|a, b| a.2.macro_f1.estimate.total_cmp(&b.2.macro_f1.estimate));
            let ood = t1.as_ref().and_then(|(folder, _, _)| {
                read_json::<ClassifyMetrics>(&d.join("t1-ood").join(folder).join("metrics.json"))
                    .map(|m| m.accuracy)
            });
            let t2 = m.t2.and_then(|f| {
                read_json::<RespondRunMetrics>(&d.join("t2").join(f).join("metrics.json"))
            });
            Headline {
                name: m.name,
                t1,
                ood,
                rouge_l: t2.as_ref().map(|r| r.scores.rouge_l),
                cosine: t2.as_ref().and_then(|r| r.scores.cosine),
            }
        })
        .collect()
}

/// The sentences: SFT against the best prompting method and TF-IDF on Task 1 (with McNemar), what
/// calibration did, Task 2's ROUGE-L ratio, and the out-of-distribution drop.
fn sentences(d: &Path, h: &[Headline]) -> Vec<String> {
    let mut out = Vec::new();
    let by = |name: &str| h.iter().find(|x| x.name == name);
    let f1 = |x: &Headline| x.t1.as_ref().map(|t| t.2.macro_f1);
    let sft = by("SFT (QLoRA)");
    let best_prompt = h
        .iter()
        .filter(|x| x.name == "0-shot" || x.name == "10-shot")
        .filter(|x| x.t1.is_some())
        .max_by(|a, b| f1(a).unwrap().estimate.total_cmp(&f1(b).unwrap().estimate));
    if let (Some(s), Some(p)) = (sft, best_prompt) {
        if let (Some((sf, _, sm)), Some((pf, prule, pm))) = (&s.t1, &p.t1) {
            let verdict = if sm.macro_f1.low > pm.macro_f1.high {
                "fine-tuning wins"
            } else if sm.macro_f1.estimate > pm.macro_f1.estimate {
                "fine-tuning is ahead, within overlapping intervals"
            } else {
                "fine-tuning does not beat prompting here"
            };
            let mut line = format!(
                "On Task 1 (category), {verdict}: SFT reaches macro-F1 {:.3} [{:.3}, {:.3}] \
                 against {:.3} for the best prompting method ({}, {prule} rule)",
                sm.macro_f1.estimate,
                sm.macro_f1.low,
                sm.macro_f1.high,
                pm.macro_f1.estimate,
                p.name
            );
            if let (Some(a), Some(b)) = (
                correctness(&d.join("t1").join(sf)),
                correctness(&d.join("t1").join(pf)),
            ) {
                let (items, t) = paired_mcnemar(&a, &b);
                line += &format!(
                    " (McNemar on {} items: {} right only for SFT, {} only for {}, {})",
                    items,
                    t.a_only,
                    t.b_only,
                    p.name,
                    super::tables::p_is(t.exact_p)
                );
            }
            if let Some(t) = by(TFIDF).and_then(f1) {
                line += &format!(
                    "; TF-IDF + logistic regression, trained on the same split, reaches {:.3} ({} SFT)",
                    t.estimate,
                    if t.estimate > sm.macro_f1.estimate {
                        "above"
                    } else {
                        "below"
                    }
                );
            }
            out.push(line + ".");
        }
    }
    // Calibration: the constrained rule against the calibrated one, per prompting method.
    let mut cal = Vec::new();
    for (name, raw, calibrated) in [
        ("0-shot", "zero-shot-constrained", "zero-shot-calibrated"),
        ("10-shot", "few-shot-constrained", "few-shot-calibrated"),
    ] {
        let read =
            |f: &str| read_json::<ClassifyMetrics>(&d.join("t1").join(f).join("metrics.json"));
        if let (Some(r), Some(c)) = (read(raw), read(calibrated)) {
            cal.push(format!(
                "{name} {:.3} → {:.3}",
                r.macro_f1.estimate, c.macro_f1.estimate
            ));
        }
    }
    if !cal.is_empty() {
        out.push(format!(
            "Contextual calibration (label probabilities divided by those of content-free messages) \
             moves the prompting methods' macro-F1 {}; the error analysis shows how much of the raw \
             rule's error is a collapse onto one label.",
            cal.join(", ")
        ));
    }
    if let Some(line) = intents(d) {
        out.push(line);
    }
    let rouge = |name: &str| by(name).and_then(|x| x.rouge_l);
    if let (Some(s), Some(z)) = (rouge("SFT (QLoRA)"), rouge("0-shot")) {
        if z.estimate > 0.0 {
            out.push(format!(
                "On Task 2 (responses), SFT's ROUGE-L is {:.3} [{:.3}, {:.3}] against {:.3} 0-shot \
                 ({:.2}×){}.",
                s.estimate,
                s.low,
                s.high,
                z.estimate,
                s.estimate / z.estimate,
                rouge("10-shot")
                    .map(|f| format!(" and {:.3} 10-shot", f.estimate))
                    .unwrap_or_default()
            ));
            if let Some(r) = rouge(TFIDF) {
                let cosine = |name: &str| by(name).and_then(|x| x.cosine);
                let cosines = match (cosine(TFIDF), cosine("SFT (QLoRA)")) {
                    (Some(rc), Some(sc)) => {
                        format!(
                            "; MiniLM cosine {:.3} against SFT's {:.3}",
                            rc.estimate, sc.estimate
                        )
                    }
                    _ => String::new(),
                };
                let verdict = if r.low > s.high {
                    "above SFT's, with disjoint intervals: the replies of one category follow shared \
                     templates, which a retrieved training reply copies and the fine-tuned model \
                     reproduces only in part"
                } else if s.low > r.high {
                    "below SFT's, with disjoint intervals"
                } else {
                    "within SFT's interval"
                };
                out.push(format!(
                    "The reply of the most similar training message of the same category (TF-IDF \
                     retrieval, no language model) reaches ROUGE-L {:.3} [{:.3}, {:.3}] ({:.2}× \
                     0-shot{cosines}), {verdict}.",
                    r.estimate,
                    r.low,
                    r.high,
                    r.estimate / z.estimate,
                ));
            }
        }
    }
    if let Some(s) = sft {
        if let (Some((_, _, m)), Some(o)) = (&s.t1, s.ood) {
            let drop = m.accuracy.estimate - o.estimate;
            let reading = if o.high < m.accuracy.low {
                format!(
                    "a drop of {drop:.3} with disjoint intervals: the in-distribution figure \
                     overstates what messages outside Bitext's templates get"
                )
            } else if drop > 0.0 {
                format!("a drop of {drop:.3}, though the two intervals overlap")
            } else {
                "no drop".to_string()
            };
            out.push(format!(
                "On the messages written for the project (`data/ood/`, no Bitext templates), SFT's \
                 accuracy is {:.3} [{:.3}, {:.3}] against {:.3} in distribution: {reading}.",
                o.estimate, o.low, o.high, m.accuracy.estimate
            ));
        }
    }
    out
}

/// The 27-intent variant of Task 1 in one sentence: SFT against the best prompting run and TF-IDF.
fn intents(d: &Path) -> Option<String> {
    let read =
        |f: &str| read_json::<ClassifyMetrics>(&d.join("t1-intent").join(f).join("metrics.json"));
    let sft = read("sft-constrained")?;
    let best = [
        ("0-shot, constrained", "zero-shot-constrained"),
        ("0-shot, calibrated", "zero-shot-calibrated"),
        ("27-shot, constrained", "few-shot-constrained"),
        ("27-shot, calibrated", "few-shot-calibrated"),
    ]
    .iter()
    .filter_map(|(name, f)| Some((*name, read(f)?)))
    .max_by(|a, b| a.1.macro_f1.estimate.total_cmp(&b.1.macro_f1.estimate));
    let f = |m: &ClassifyMetrics| {
        format!(
            "{:.3} [{:.3}, {:.3}]",
            m.macro_f1.estimate, m.macro_f1.low, m.macro_f1.high
        )
    };
    let mut line = format!(
        "On the harder 27-intent variant of Task 1, SFT reaches macro-F1 {} on {} items",
        f(&sft),
        sft.items
    );
    if let Some((name, m)) = best {
        line += &format!(" against {} for the best prompting run ({name})", f(&m));
    }
    if let Some(t) = read("tfidf") {
        line += &format!(" and {} for TF-IDF + logistic regression", f(&t));
    }
    Some(line + ".")
}

/// Writes the summary section (nothing when no Task 1 or Task 2 run has finished).
pub(super) fn section(md: &mut String, d: &Path) -> anyhow::Result<()> {
    let h = headlines(d);
    if h.iter().all(|x| x.t1.is_none() && x.rouge_l.is_none()) {
        return Ok(());
    }
    writeln!(md, "## Summary\n")?;
    for s in sentences(d, &h) {
        writeln!(md, "- {s}")?;
    }
    md.push('\n');
    let rows: Vec<Vec<String>> = h
        .iter()
        .map(|x| {
            vec![
                x.name.to_string(),
                x.t1.as_ref().map_or("–".into(), |t| t.1.to_string()),
                interval(x.t1.as_ref().map(|t| &t.2.accuracy)),
                interval(x.t1.as_ref().map(|t| &t.2.macro_f1)),
                interval(x.ood.as_ref()),
                interval(x.rouge_l.as_ref()),
                interval(x.cosine.as_ref()),
            ]
        })
        .collect();
    table(
        md,
        &[
            "method",
            "Task 1 rule",
            "Task 1 accuracy (95%)",
            "Task 1 macro-F1 (95%)",
            "Task 1 OOD accuracy (95%)",
            "Task 2 ROUGE-L F (95%)",
            "Task 2 MiniLM cosine (95%)",
        ],
        &rows,
    );
    let fig = d.join("figures");
    std::fs::create_dir_all(&fig)?;
    let names: Vec<String> = h.iter().map(|x| x.name.to_string()).collect();
    let f1: Vec<Option<Interval>> = h
        .iter()
        .map(|x| x.t1.as_ref().map(|t| t.2.macro_f1))
        .collect();
    let rl: Vec<Option<Interval>> = h.iter().map(|x| x.rouge_l).collect();
    let values = |v: &[Option<Interval>]| v.iter().map(|i| i.map_or(0.0, |i| i.estimate)).collect();
    let whiskers = |v: &[Option<Interval>]| v.iter().map(|i| i.map(|i| (i.low, i.high))).collect();
    supportlm_plots::bar_chart_with_intervals(
        &fig.join("summary"),
        "Task 1 macro-F1 and Task 2 ROUGE-L per method (95% intervals)",
        "score",
        &names,
        &[
            ("Task 1 macro-F1".into(), values(&f1)),
            ("Task 2 ROUGE-L F".into(), values(&rl)),
        ],
        &[whiskers(&f1), whiskers(&rl)],
    )?;
    writeln!(md, "![Summary](figures/summary.svg)\n")?;
    Ok(())
}
