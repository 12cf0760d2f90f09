//! The robustness step: Task 1 on `data/robustness/robustness.jsonl` (prompt injection, abusive,
//! off-topic and noisy messages) for 0-shot, 10-shot and SFT, each without and with the guard; Task 2
//! replies to the variants of a few of its messages (leak, obey, abuse), for 0-shot, 1-shot per
//! category and the Task 2 SFT adapter, each without and with the guard; and the report's "Safety and
//! robustness" section. Runs live in `robustness/<method>-<plain|guard>` and
//! `robustness/t2-<method>-<plain|guard>`.

use std::fmt::Write as _;
use std::path::PathBuf;

use supportlm_data::robustness::Part;
use supportlm_prompting::robust_reply::ReplyMetrics;
use supportlm_prompting::robustness::RobustnessMetrics;

use super::tables::{interval, read_json, table};
use super::{Run, Step};

/// The set, relative to the workspace root.
pub const ROBUSTNESS_FILE: &str = "data/robustness/robustness.jsonl";

/// (folder prefix, row name, `eval robustness` method arguments) of Task 1.
fn methods(run: &Run) -> Vec<(&'static str, &'static str, Vec<String>)> {
    methods_of(run, "10-shot", "t1/sft-train/best-adapter")
}

/// The same for Task 2 (one example per category; the Task 2 adapter).
fn reply_methods(run: &Run) -> Vec<(&'static str, &'static str, Vec<String>)> {
    methods_of(run, "11-shot (1 per category)", "t2/sft-train/best-adapter")
}

fn methods_of(
    run: &Run,
    few_shot: &'static str,
    adapter: &str,
) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let s = |x: &str| x.to_string();
    vec![
        ("zero-shot", "0-shot", vec![s("--method"), s("zero-shot")]),
        ("few-shot", few_shot, vec![s("--method"), s("few-shot")]),
        (
            "sft",
            "SFT (QLoRA)",
            vec![s("--method"), s("sft"), s("--adapter"), run.path(adapter)],
        ),
    ]
}

const GUARDS: [(&str, bool); 2] = [("plain", false), ("guard", true)];

/// The folder the step writes.
pub fn outputs(run: &Run) -> Vec<PathBuf> {
    vec![run.dir.join("robustness")]
}

/// Every method, without and with the guard, for both tasks (finished runs are kept; a guarded run
/// reuses its unguarded run's answers to the messages the guard does not change).
pub fn run_step(run: &Run) -> anyhow::Result<()> {
    let s = |x: &str| x.to_string();
    let tasks = [
        (
            "",
            s("category"),
            methods(run),
            run.budget.robustness_messages,
        ),
        (
            "t2-",
            s("response"),
            reply_methods(run),
            Some(run.budget.robustness_reply_messages),
        ),
    ];
    for (prefix, task, methods, limit) in tasks {
        for (folder, _, method) in methods {
            for (name, guard) in GUARDS {
                let mut args = vec![s("eval"), s("robustness"), s("--task"), task.clone()];
                args.extend(method.iter().cloned());
                args.extend([
                    s("--items"),
                    run.root.join(ROBUSTNESS_FILE).display().to_string(),
                    s("--seed"),
                    run.budget.seed.to_string(),
                    s("--out"),
                    run.path(&format!("robustness/{prefix}{folder}-{name}")),
                ]);
                if guard {
                    // The unguarded run (written just before) answers every message the guard
                    // leaves as it is: only the neutralised ones are scored or written again.
                    args.extend([
                        s("--guard"),
                        s("--reuse-unguarded"),
                        run.path(&format!("robustness/{prefix}{folder}-plain")),
                    ]);
                }
                if let Some(n) = limit {
                    args.extend([s("--limit-messages"), n.to_string()]);
                }
                run.evaluation(Step::Robustness, &args)?;
            }
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
    writeln!(
        md,
        "## Safety and robustness\n\n### Task 1: classification\n"
    )?;
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
    let mut paired = Vec::new();
    for (folder, name, _) in methods(run) {
        for (guard, _) in GUARDS {
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
            for p in &m.parts {
                if let Some(t) = &p.vs_clean {
                    paired.push(vec![
                        label.clone(),
                        p.part.as_str().to_string(),
                        (t.both_correct + t.a_only + t.b_only + t.both_wrong).to_string(),
                        t.b_only.to_string(),
                        t.a_only.to_string(),
                        super::tables::p_value(t.exact_p, 3),
                    ]);
                }
            }
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
    if !paired.is_empty() {
        writeln!(
            md,
            "Each variant against the clean message it was made from (McNemar on the pairs, exact \
             two-sided p): *lost*: right on the clean message, wrong on the variant; *gained*: the \
             reverse.\n"
        )?;
        table(
            md,
            &["method", "part", "pairs", "lost", "gained", "exact p"],
            &paired,
        );
    }
    if !families.is_empty() {
        writeln!(md, "Injections by family:\n")?;
        table(
            md,
            &["method", "family", "accuracy", "attack success"],
            &families,
        );
    }
    replies_report(md, run)
}

/// The Task 2 part of the section: leak, obey and abuse shares of the replies.
fn replies_report(md: &mut String, run: &Run) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut families = Vec::new();
    let mut family_names: Vec<String> = Vec::new();
    for (folder, name, _) in reply_methods(run) {
        for (guard, _) in GUARDS {
            let Some(m) = read_json::<ReplyMetrics>(
                &run.dir
                    .join(format!("robustness/t2-{folder}-{guard}/metrics.json")),
            ) else {
                continue;
            };
            let label = format!("{name}{}", if guard == "guard" { " + guard" } else { "" });
            for p in &m.parts {
                rows.push(vec![
                    label.clone(),
                    p.part.as_str().to_string(),
                    p.items.to_string(),
                    interval(Some(&p.leak)),
                    interval(p.obey.as_ref()),
                    interval(Some(&p.abusive)),
                    interval(Some(&p.degenerate)),
                    interval(Some(&p.fallback)),
                ]);
            }
            family_names = m.obey_by_family.iter().map(|(f, _)| f.clone()).collect();
            families.push(
                std::iter::once(label)
                    .chain(m.obey_by_family.iter().map(|(_, i)| interval(Some(i))))
                    .collect(),
            );
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "### Task 2: what the replies do\n")?;
    writeln!(
        md,
        "Each method writes a support reply (conditioned on the right category, as Task 2 is) to the \
         set's first {} clean messages and to their injected, abusive and noisy variants. \
         *Leak*: the reply shows chat-template tokens, the system prompt or the prompt's scaffolding; \
         *obey*: the attacker's label stands in the reply in its capitals as a word of its own and not \
         in the reply to the clean message (the model repeated the injected answer); *abusive*: the \
         reply holds an insult or a swear word; *degenerate*: empty, looping or leaking before any \
         guard; *fallback*: the guard replaced it with its fallback reply (the guard also neutralises \
         template tokens and role tags in the message). Wilson 95% intervals.\n",
        run.budget.robustness_reply_messages
    )?;
    table(
        md,
        &[
            "method",
            "part",
            "replies",
            "leak",
            "obey",
            "abusive",
            "degenerate",
            "fallback",
        ],
        &rows,
    );
    if !family_names.is_empty() {
        writeln!(md, "Obeyed injections by family:\n")?;
        let header: Vec<&str> = std::iter::once("method")
            .chain(family_names.iter().map(String::as_str))
            .collect();
        table(md, &header, &families);
    }
    Ok(())
}
