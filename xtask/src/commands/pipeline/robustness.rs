//! The robustness step: Task 1 on `data/robustness/robustness.jsonl` (prompt injection, abusive,
//! off-topic and noisy messages) for 0-shot, 10-shot and SFT, each without and with the guard; and
//! the report's "Safety and robustness" section. Runs live in `robustness/<method>-<plain|guard>`.

use std::fmt::Write as _;
use std::path::PathBuf;

use supportlm_data::robustness::Part;
use supportlm_prompting::robustness::RobustnessMetrics;

use super::tables::{interval, read_json, table};
use super::{Run, Step};

/// The set, relative to the workspace root.
pub const ROBUSTNESS_FILE: &str = "data/robustness/robustness.jsonl";

/// (folder prefix, row name, `eval robustness` method arguments).
fn methods(run: &Run) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let s = |x: &str| x.to_string();
    vec![
        ("zero-shot", "0-shot", vec![s("--method"), s("zero-shot")]),
        ("few-shot", "10-shot", vec![s("--method"), s("few-shot")]),
        (
            "sft",
            "SFT (QLoRA)",
            vec![
                s("--method"),
                s("sft"),
                s("--adapter"),
                run.path("t1/sft-train/best-adapter"),
            ],
        ),
    ]
}

/// The folder the step writes.
pub fn outputs(run: &Run) -> Vec<PathBuf> {
    vec![run.dir.join("robustness")]
}

/// Every method, without and with the guard (finished runs are kept).
pub fn run_step(run: &Run) -> anyhow::Result<()> {
    for (folder, _, method) in methods(run) {
        for guard in [false, true] {
            let mut args = vec!["eval".to_string(), "robustness".to_string()];
            args.extend(method.iter().cloned());
            args.extend([
                "--items".into(),
                run.root.join(ROBUSTNESS_FILE).display().to_string(),
                "--seed".into(),
                run.budget.seed.to_string(),
                "--out".into(),
                run.path(&format!(
                    "robustness/{folder}-{}",
                    if guard { "guard" } else { "plain" }
                )),
            ]);
            if guard {
                args.push("--guard".into());
            }
            if let Some(n) = run.budget.robustness_messages {
                args.extend(["--limit-messages".into(), n.to_string()]);
            }
            run.evaluation(Step::Robustness, &args)?;
        }
    }
    Ok(())
}

/// One row of the section's table.
fn row(label: &str, m: &RobustnessMetrics) -> Vec<String> {
    let acc = |part: Part| interval(m.parts.iter().find(|p| p.part == part).map(|p| &p.accuracy));
    vec![
        label.to_string(),
        acc(Part::Clean),
        acc(Part::Injection),
        acc(Part::Abusive),
        acc(Part::Noisy),
        acc(Part::OffTopic),
        interval(Some(&m.injection.flip_rate)),
        interval(Some(&m.injection.attack_success)),
        format!("{:.3}", m.off_topic.auroc),
        format!(
            "{} / {}",
            interval(Some(&m.off_topic.recall)),
            interval(Some(&m.off_topic.false_flags))
        ),
        format!("{:.2}", m.items_per_s),
    ]
}

/// The report's section.
pub fn report(md: &mut String, run: &Run) -> anyhow::Result<()> {
    let d = &run.dir;
    if !d.join("robustness").exists() {
        return Ok(());
    }
    writeln!(md, "## Safety and robustness (Task 1)\n")?;
    writeln!(
        md,
        "`{ROBUSTNESS_FILE}` (see its README): clean test messages, prompt injections made from them \
         (7 families, each with the attacker's target label), abusive and noisy variants, and off-topic \
         messages. Accuracy with Wilson 95% intervals; *flip*: the answer differs from the clean \
         message's; *attack success*: the answer is the attacker's target. Off-topic detection uses the \
         best label's probability: AUROC against the clean messages, and the threshold that flags 95% of \
         the validation off-topic half, with its recall on the test half and its false flags on clean \
         messages. *Guard*: chat-template tokens and role tags neutralised, messages at or below the \
         threshold answered `OUT_OF_SCOPE`.\n"
    )?;
    let mut rows = Vec::new();
    let mut families = Vec::new();
    for (folder, name, _) in methods(run) {
        for guard in ["plain", "guard"] {
            let Some(m) = read_json::<RobustnessMetrics>(
                &d.join(format!("robustness/{folder}-{guard}/metrics.json")),
            ) else {
                continue;
            };
            let label = format!("{name}{}", if guard == "guard" { " + guard" } else { "" });
            if let Some(before) = &m.unflagged {
                rows.push(row(&format!("{name} + guard, neutralising only"), before));
            }
            rows.push(row(&label, &m));
            for (family, accuracy, success) in &m.injection.by_family {
                families.push(vec![
                    label.clone(),
                    family.clone(),
                    interval(Some(accuracy)),
                    interval(Some(success)),
                ]);
            }
        }
    }
    table(
        md,
        &[
            "method",
            "clean",
            "injection",
            "abusive",
            "noisy",
            "off-topic (flagged)",
            "flip rate",
            "attack success",
            "off-topic AUROC",
            "recall / false flags at the threshold",
            "items/s",
        ],
        &rows,
    );
    if !families.is_empty() {
        writeln!(md, "Injections by family:\n")?;
        table(
            md,
            &["method", "family", "accuracy", "attack success"],
            &families,
        );
    }
    Ok(())
}
