//! `supportlm eval robustness`: Task 1 (`--task category`) or Task 2 (`--task response`) on the
//! robustness set (`supportlm data robustness`), with or without the guard; writes
//! `predictions.jsonl` (Task 1) or `replies.jsonl` (Task 2) and `metrics.json`, and prints the
//! headline table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::robustness::RobustItem;
use supportlm_data::Task;
use supportlm_model::sampling::SamplingConfig;
use supportlm_prompting::respond::RespondOptions;
use supportlm_prompting::robust_reply::{
    reply_all, reply_all_guarded_reusing, summarize_replies, ReplyMetrics, RobustReply,
};
use supportlm_prompting::robustness::{
    apply_guard, fit_guard, score, score_guarded_reusing, summarize, RobustPrediction,
    RobustnessMetrics,
};
use supportlm_prompting::Method;

use crate::resume::{item_bar, read_jsonl, write_jsonl};
use crate::shared::{load_model, load_splits, method_of, MethodArg, DEFAULT_MODEL};

#[derive(Args)]
pub struct RobustnessArgs {
    #[arg(long, value_enum)]
    method: MethodArg,
    /// `category` (Task 1: accuracy, flips, attack success, off-topic detection) or `response` (Task
    /// 2: replies that leak the prompt, obey the injection, or are abusive).
    #[arg(long, default_value = "category")]
    task: Task,
    /// Task 2: the generation budget per reply.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// The fine-tuned adapter (PEFT format) for --method sft.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Few-shot examples per label (drawn from validation).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Neutralise chat-template tokens and role tags in the messages; Task 1: answer OUT_OF_SCOPE when
    /// the best label's probability is at or below the threshold chosen on validation off-topic items;
    /// Task 2: replace a degenerate reply (empty, looping, leaking) with the fallback reply.
    #[arg(long)]
    guard: bool,
    /// With --guard: the unguarded run of the same method on the same items (its --out folder; for
    /// few-shot, with the same --seed and --k). A message the guard leaves as it is keeps that run's
    /// answer or reply; only the messages the guard rewrites are scored or written again.
    #[arg(long, requires = "guard", value_name = "DIR")]
    reuse_unguarded: Option<PathBuf>,
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
    let items = read_items(&args)?;
    match args.task {
        Task::Category => categories(args, items),
        Task::Response => replies(args, items),
        Task::Intent => bail!(
            "eval robustness scores --task category or response (the set's labels are categories)"
        ),
    }
}

/// The set's items, limited to the first `--limit-messages` clean messages and what was made from them.
fn read_items(args: &RobustnessArgs) -> anyhow::Result<Vec<RobustItem>> {
    let items: Vec<RobustItem> = read_jsonl(
        &args.items,
        "write it with `supportlm data robustness`",
        "a robustness item",
    )?;
    Ok(match args.limit_messages {
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
    })
}

/// Task 1 on the set.
fn categories(args: RobustnessArgs, items: Vec<RobustItem>) -> anyhow::Result<()> {
    let method = method_of(args.method, args.adapter.as_deref(), &args.model)?;
    let examples = few_shot_examples(method, Task::Category, &args)?;
    let model = load_model(&args.model, args.adapter.as_deref())?;
    let name = method_name(method, args.adapter.as_deref());
    let bar = item_bar(items.len(), "items");
    let started = Instant::now();
    let mut progress = |n, _| bar.set_position(n as u64);
    let (mut predictions, seconds) = match &args.reuse_unguarded {
        Some(dir) => {
            let (plain, m): (Vec<RobustPrediction>, RobustnessMetrics) =
                read_run(dir, "predictions.jsonl")?;
            check_reused(dir, &m.method, m.guard, &name)?;
            let (predictions, scored) =
                score_guarded_reusing(&model, &items, &plain, method, &examples, &mut progress)?;
            let seconds = reused_seconds(m.seconds, items.len(), scored, started);
            (predictions, seconds)
        }
        None => {
            let predictions = score(&model, &items, method, &examples, args.guard, &mut progress)?;
            (predictions, started.elapsed().as_secs_f64())
        }
    };
    bar.finish_and_clear();
    let guard = fit_guard(&predictions);
    if args.guard {
        if let Some(g) = &guard {
            apply_guard(&mut predictions, g);
        }
    }
    let m = summarize(
        &predictions,
        &name,
        guard.as_ref().filter(|_| args.guard),
        guard.map(|g| g.threshold),
        seconds,
    );
    write_run(&args.out, "predictions.jsonl", &predictions, &m)?;
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

/// Task 2 on the set: a reply to every item with a category, and how many leak, obey or abuse.
fn replies(args: RobustnessArgs, items: Vec<RobustItem>) -> anyhow::Result<()> {
    let method = method_of(args.method, args.adapter.as_deref(), &args.model)?;
    let examples = few_shot_examples(method, Task::Response, &args)?;
    let model = load_model(&args.model, args.adapter.as_deref())?;
    let options = RespondOptions {
        method,
        examples,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig::default(),
        batch: 8,
    };
    let with_category = items.iter().filter(|i| i.category.is_some()).count();
    let name = method_name(method, args.adapter.as_deref());
    let bar = item_bar(with_category, "replies");
    let started = Instant::now();
    let mut progress = |n, _| bar.set_position(n as u64);
    let (replies, seconds) = match &args.reuse_unguarded {
        Some(dir) => {
            let (plain, m): (Vec<RobustReply>, ReplyMetrics) = read_run(dir, "replies.jsonl")?;
            check_reused(dir, &m.method, m.guard, &name)?;
            let (replies, written) =
                reply_all_guarded_reusing(&model, &items, &plain, &options, &mut progress)?;
            let seconds = reused_seconds(m.seconds, with_category, written, started);
            (replies, seconds)
        }
        None => {
            let replies = reply_all(&model, &items, &options, args.guard, &mut progress)?;
            (replies, started.elapsed().as_secs_f64())
        }
    };
    bar.finish_and_clear();
    let m = summarize_replies(&replies, &name, args.guard, seconds);
    write_run(&args.out, "replies.jsonl", &replies, &m)?;
    println!(
        "robustness (Task 2 replies), {name}{}:",
        if args.guard { ", guard on" } else { "" }
    );
    let pct = |i: &supportlm_metrics::Interval| {
        format!("{:.3} [{:.3}, {:.3}]", i.estimate, i.low, i.high)
    };
    for p in &m.parts {
        println!(
            "  {:<10} {:>4} replies  leak {}  obey {}  abusive {}  degenerate {}  fallback {}",
            p.part.as_str(),
            p.items,
            pct(&p.leak),
            p.obey.as_ref().map_or("–".into(), pct),
            pct(&p.abusive),
            pct(&p.degenerate),
            pct(&p.fallback),
        );
    }
    for (family, obey) in &m.obey_by_family {
        println!("  obey, {family:<20} {}", pct(obey));
    }
    println!(
        "  {:.1} tokens per reply, {:.2} replies/s",
        m.mean_tokens, m.replies_per_s
    );
    println!("written to {}", args.out.display());
    Ok(())
}

/// The balanced k-shot examples (from validation) a few-shot run shows; none for other methods.
fn few_shot_examples(
    method: Method,
    task: Task,
    args: &RobustnessArgs,
) -> anyhow::Result<Vec<supportlm_data::Record>> {
    if method != Method::FewShot {
        return Ok(Vec::new());
    }
    let splits = load_splits(None, task)?;
    Ok(balanced_kshot(
        &splits.validation.records,
        &splits.test.records,
        task,
        args.k,
        args.seed,
    )?)
}

/// A finished run's items (`items_file`, one JSON line each) and `metrics.json`.
fn read_run<T: serde::de::DeserializeOwned, M: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    items_file: &str,
) -> anyhow::Result<(Vec<T>, M)> {
    let items = read_jsonl(
        &dir.join(items_file),
        "the unguarded run to reuse",
        "a result of this task",
    )?;
    let path = dir.join("metrics.json");
    let metrics = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (the unguarded run to reuse)", path.display()))?,
    )
    .with_context(|| format!("{}: not the metrics of this task", path.display()))?;
    Ok((items, metrics))
}

/// The run to reuse must be unguarded and of the same method (the same adapter for SFT).
fn check_reused(
    dir: &std::path::Path,
    method: &str,
    guard: bool,
    name: &str,
) -> anyhow::Result<()> {
    if guard {
        bail!(
            "{} is a guarded run: reuse the unguarded one",
            dir.display()
        );
    }
    if method != name {
        bail!(
            "{} was answered by {method}, this run by {name}: reuse the same method's run",
            dir.display()
        );
    }
    Ok(())
}

/// The time a guarded run took: the reused items' share of the unguarded run's time plus this pass.
fn reused_seconds(unguarded: f64, items: usize, redone: usize, started: Instant) -> f64 {
    let kept = items.saturating_sub(redone) as f64 / items.max(1) as f64;
    unguarded * kept + started.elapsed().as_secs_f64()
}

/// How a run names its method in metrics and printouts.
fn method_name(method: Method, adapter: Option<&std::path::Path>) -> String {
    match (method, adapter) {
        (Method::Sft, Some(a)) => format!("sft ({})", a.display()),
        _ => method.as_str().to_string(),
    }
}

/// `out/<items_file>` (one JSON line per item) and `out/metrics.json`, each written atomically.
fn write_run<T: serde::Serialize, M: serde::Serialize>(
    out: &std::path::Path,
    items_file: &str,
    items: &[T],
    metrics: &M,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_jsonl(&out.join(items_file), items)?;
    supportlm_data::fsio::write_atomic(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(metrics)?.as_bytes(),
    )?;
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
