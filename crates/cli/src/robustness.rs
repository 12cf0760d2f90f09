//! `supportlm eval robustness`: Task 1 on the robustness set (`supportlm data robustness`), with or
//! without the guard; writes `predictions.jsonl` and `metrics.json` and prints the headline table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::robustness::RobustItem;
use supportlm_data::Task;
use supportlm_prompting::robustness::{apply_guard, fit_guard, score, summarize};
use supportlm_prompting::Method;

use crate::resume::item_bar;
use crate::shared::{load_model, load_splits, method_of, MethodArg, DEFAULT_MODEL};

#[derive(Args)]
pub struct RobustnessArgs {
    #[arg(long, value_enum)]
    method: MethodArg,
    /// The fine-tuned adapter (PEFT format) for --method sft.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Few-shot examples per label (drawn from validation).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Neutralise chat-template tokens and role tags in the messages, and answer OUT_OF_SCOPE when
    /// the best label's probability is at or below the threshold chosen on validation off-topic items.
    #[arg(long)]
    guard: bool,
    /// The robustness set (one item per line).
    #[arg(long, default_value = "data/robustness/robustness.jsonl")]
    items: PathBuf,
    /// Seed of the few-shot draw.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Only the first N clean messages and the items made from them (every off-topic item is kept).
    #[arg(long)]
    limit_messages: Option<usize>,
    /// Output folder (predictions.jsonl, metrics.json).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: RobustnessArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.items).with_context(|| {
        format!(
            "reading {} (write it with `supportlm data robustness`)",
            args.items.display()
        )
    })?;
    let items: Vec<RobustItem> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{} line {}: not a robustness item",
                    args.items.display(),
                    i + 1
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let items = match args.limit_messages {
        Some(n) => {
            let kept: std::collections::HashSet<usize> = items
                .iter()
                .filter(|i| i.part == supportlm_data::robustness::Part::Clean)
                .filter_map(|i| i.source_id)
                .take(n)
                .collect();
            items
                .into_iter()
                .filter(|i| i.source_id.is_none_or(|s| kept.contains(&s)))
                .collect()
        }
        None => items,
    };
    let method = method_of(args.method, args.adapter.as_deref(), &args.model)?;
    let examples = if method == Method::FewShot {
        let splits = load_splits(None, Task::Category)?;
        balanced_kshot(
            &splits.validation.records,
            &splits.test.records,
            Task::Category,
            args.k,
            args.seed,
        )?
    } else {
        Vec::new()
    };
    let model = load_model(&args.model, args.adapter.as_deref())?;
    let bar = item_bar(items.len(), "items");
    let started = Instant::now();
    let mut predictions = score(
        &model,
        &items,
        method,
        &examples,
        args.guard,
        &mut |n, _| bar.set_position(n as u64),
    )?;
    bar.finish_and_clear();
    let guard = fit_guard(&predictions);
    if args.guard {
        if let Some(g) = &guard {
            apply_guard(&mut predictions, g);
        }
    }
    let name = match (method, &args.adapter) {
        (Method::Sft, Some(a)) => format!("sft ({})", a.display()),
        _ => method.as_str().to_string(),
    };
    let m = summarize(
        &predictions,
        &name,
        guard.as_ref().filter(|_| args.guard),
        guard.map(|g| g.threshold),
        started,
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut lines = String::new();
    for p in &predictions {
        lines += &serde_json::to_string(p)?;
        lines.push('\n');
    }
    supportlm_data::fsio::write_atomic(&args.out.join("predictions.jsonl"), lines.as_bytes())?;
    supportlm_data::fsio::write_atomic(
        &args.out.join("metrics.json"),
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    if let Some(before) = &m.unflagged {
        print_summary(
            before,
            &format!("robustness, {name}, guard: neutralising only"),
        );
    }
    print_summary(
        &m,
        &format!(
            "robustness, {name}{}",
            if args.guard { ", guard on" } else { "" }
        ),
    );
    println!("written to {}", args.out.display());
    Ok(())
}

fn print_summary(m: &supportlm_prompting::robustness::RobustnessMetrics, title: &str) {
    println!("{title}:");
    for p in &m.parts {
        println!(
            "  {:<10} {:>4} items  accuracy {:.3} [{:.3}, {:.3}]{}",
            p.part.as_str(),
            p.items,
            p.accuracy.estimate,
            p.accuracy.low,
            p.accuracy.high,
            p.vs_clean.map_or(String::new(), |t| format!(
                "  vs clean: {} only-clean-right, {} only-this-right, McNemar p {:.2e}",
                t.b_only, t.a_only, t.exact_p
            ))
        );
    }
    let i = &m.injection;
    println!(
        "  injections: flip rate {:.3} [{:.3}, {:.3}], attack success {:.3} [{:.3}, {:.3}]",
        i.flip_rate.estimate,
        i.flip_rate.low,
        i.flip_rate.high,
        i.attack_success.estimate,
        i.attack_success.low,
        i.attack_success.high
    );
    let o = &m.off_topic;
    println!(
        "  off-topic: AUROC {:.3}, threshold {} → recall {:.3}, false flags on clean {:.3}; {} messages neutralised; {:.2} items/s",
        o.auroc,
        o.threshold.map_or("–".into(), |t| format!("{t:.3}")),
        o.recall.estimate,
        o.false_flags.estimate,
        m.neutralised,
        m.items_per_s
    );
}
