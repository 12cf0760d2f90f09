//! The out-of-distribution step: every Task 1 method scored on the hand-written messages of
//! `data/ood/ood.csv` (no Bitext templates, no placeholders; see `data/ood/README.md`), and the
//! report's in-distribution vs out-of-distribution section. Runs live in `t1-ood/<method>`; each is
//! an `eval` run like those of `t1/`, so a finished one is kept when the step is resumed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use supportlm_metrics::two_proportion_test;
use supportlm_prompting::report::ClassifyMetrics;

use super::tables::{correctness, interval, mcnemar_table, read_json, table};
use super::{sweeps, Run, Step};

/// The set, relative to the workspace root.
pub const OOD_FILE: &str = "data/ood/ood.csv";

/// One method on the OOD set: its folder under `t1-ood/`, its row name, and the in-distribution run
/// it is compared with (a folder under the run, `None` when there is none).
struct Method {
    folder: String,
    name: String,
    in_distribution: Option<String>,
    /// `eval` arguments after `supportlm` (without `--items-file`, `--seed` and `--out`).
    args: Vec<String>,
}

fn methods(run: &Run) -> anyhow::Result<Vec<Method>> {
    let s = |x: &str| x.to_string();
    let data = run.path("data/category");
    let rule = |method: &str, decision: &str| {
        vec![
            s("eval"),
            s("classify"),
            s("--method"),
            s(method),
            s("--decision"),
            s(decision),
            s("--data"),
            data.clone(),
        ]
    };
    let classify = |method: &str| rule(method, "constrained");
    let mut out = vec![
        Method {
            folder: s("tfidf"),
            name: s("TF-IDF + logistic regression"),
            in_distribution: Some(s("t1/tfidf")),
            args: [s("eval"), s("tfidf"), s("--data"), data.clone()]
                .into_iter()
                .chain(
                    run.budget
                        .tfidf_train
                        .map(|n| [s("--train-limit"), n.to_string()])
                        .into_iter()
                        .flatten(),
                )
                .collect(),
        },
        Method {
            folder: s("zero-shot-constrained"),
            name: s("0-shot, constrained"),
            in_distribution: Some(s("t1/zero-shot-constrained")),
            args: classify("zero-shot"),
        },
        Method {
            folder: s("zero-shot-calibrated"),
            name: s("0-shot, calibrated"),
            in_distribution: Some(s("t1/zero-shot-calibrated")),
            args: rule("zero-shot", "calibrated"),
        },
        Method {
            folder: s("few-shot-constrained"),
            name: s("10-shot, constrained"),
            in_distribution: Some(s("t1/few-shot-constrained")),
            args: classify("few-shot"),
        },
        Method {
            folder: s("few-shot-calibrated"),
            name: s("10-shot, calibrated"),
            in_distribution: Some(s("t1/few-shot-calibrated")),
            args: rule("few-shot", "calibrated"),
        },
    ];
    for p in sweeps::points(run, Step::LearningCurve)? {
        let folder = p.folder(Step::LearningCurve);
        let mut args = classify("sft");
        args.extend([
            s("--adapter"),
            run.path(&format!("{folder}/train/best-adapter")),
        ]);
        out.push(Method {
            folder: format!("sft-n{}", p.examples),
            name: format!("SFT, {} examples (learning curve)", p.examples),
            in_distribution: Some(format!("{folder}/eval")),
            args,
        });
    }
    let mut args = classify("sft");
    args.extend([s("--adapter"), run.path("t1/sft-train/best-adapter")]);
    out.push(Method {
        folder: s("sft-constrained"),
        name: s("SFT (QLoRA), constrained"),
        in_distribution: Some(s("t1/sft-constrained")),
        args,
    });
    Ok(out)
}

/// The folder the step writes.
pub fn outputs(run: &Run) -> Vec<PathBuf> {
    vec![run.dir.join("t1-ood")]
}

/// Scores every method on the OOD set (finished runs are kept). A prompting method's calibrated rule
/// comes from the pass of its constrained rule; it runs alone only when that pass had finished before
/// without it.
pub fn run_step(run: &Run) -> anyhow::Result<()> {
    let file = run.root.join(OOD_FILE);
    let all = methods(run)?;
    for m in &all {
        let mut args = m.args.clone();
        let calibrated = m
            .folder
            .strip_suffix("-constrained")
            .map(|method| format!("{method}-calibrated"))
            .filter(|c| all.iter().any(|o| &o.folder == c));
        if let Some(c) = calibrated {
            args.extend(["--calibrated-out".into(), run.path(&format!("t1-ood/{c}"))]);
        }
        args.extend([
            "--items-file".into(),
            file.display().to_string(),
            "--seed".into(),
            run.budget.seed.to_string(),
            "--out".into(),
            run.path(&format!("t1-ood/{}", m.folder)),
        ]);
        if let Some(n) = run.budget.ood_items {
            args.extend(["--limit".into(), n.to_string()]);
        }
        run.evaluation(Step::T1Ood, &args)?;
    }
    Ok(())
}

/// The report's section: in- vs out-of-distribution per method, McNemar between methods on the OOD
/// items, and the SFT confusion on them.
pub fn report(md: &mut String, run: &Run) -> anyhow::Result<()> {
    let d = &run.dir;
    if !d.join("t1-ood").exists() {
        return Ok(());
    }
    writeln!(
        md,
        "## Out of distribution: hand-written messages (Task 1)\n"
    )?;
    writeln!(
        md,
        "{} messages of `{OOD_FILE}`, written for the project: no Bitext templates, no \
         placeholders; typos, several registers, indirect requests (labelling rules and a second blind \
         pass in `data/ood/README.md`). Each method as in the sections above, on those messages; \
         \"drop\" is in-distribution minus OOD accuracy, tested with the two-proportion z-test (the item \
         sets differ, so McNemar applies only between methods on the same set, below).\n",
        read_json::<ClassifyMetrics>(&d.join("t1-ood/tfidf/metrics.json"))
            .map_or("The hand-written".to_string(), |m| format!("{} of the hand-written", m.items))
    )?;
    let mut rows = Vec::new();
    let mut correct: Vec<(String, HashMap<u64, bool>)> = Vec::new();
    for m in methods(run)? {
        let dir = d.join("t1-ood").join(&m.folder);
        let Some(ood) = read_json::<ClassifyMetrics>(&dir.join("metrics.json")) else {
            continue;
        };
        let inside = m
            .in_distribution
            .as_ref()
            .and_then(|f| read_json::<ClassifyMetrics>(&d.join(f).join("metrics.json")));
        let hits = |m: &ClassifyMetrics| (m.accuracy.estimate * m.items as f64).round() as usize;
        let (drop, p) = match &inside {
            Some(i) => {
                let t = two_proportion_test(hits(i), i.items, hits(&ood), ood.items);
                (
                    format!("{:+.4}", t.difference),
                    super::tables::p_value(t.p, 2),
                )
            }
            None => ("–".into(), "–".into()),
        };
        rows.push(vec![
            m.name.clone(),
            inside.as_ref().map_or("–".into(), |i| i.items.to_string()),
            interval(inside.as_ref().map(|i| &i.accuracy)),
            interval(inside.as_ref().map(|i| &i.macro_f1)),
            ood.items.to_string(),
            interval(Some(&ood.accuracy)),
            interval(Some(&ood.macro_f1)),
            drop,
            p,
        ]);
        if let Some(c) = correctness(&dir) {
            correct.push((m.name.clone(), c));
        }
    }
    table(
        md,
        &[
            "method",
            "test items",
            "test accuracy",
            "test macro-F1",
            "OOD items",
            "OOD accuracy (Wilson 95%)",
            "OOD macro-F1 (bootstrap 95%)",
            "drop",
            "p (two-proportion)",
        ],
        &rows,
    );
    if correct.len() >= 2 {
        writeln!(md, "McNemar's test between methods on the OOD messages:\n")?;
        let named: Vec<(&str, HashMap<u64, bool>)> = correct
            .iter()
            .map(|(n, c)| (n.as_str(), c.clone()))
            .collect();
        mcnemar_table(md, &named);
    }
    let sft = "t1-ood/sft-constrained/confusion.svg";
    if d.join(sft).exists() {
        writeln!(
            md,
            "Confusion matrix on the OOD messages, SFT, constrained:\n"
        )?;
        writeln!(md, "![OOD confusion, SFT]({sft})\n")?;
    }
    Ok(())
}
