//! `supportlm classify "message"`: one message → its label, the confidence and the runners-up (the
//! quick check before a full evaluation).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::Task;
use supportlm_prompting::{label_probabilities, Method};

use crate::shared::{load_model, load_splits, method_of, MethodArg, DEFAULT_MODEL};

#[derive(Args)]
pub struct ClassifyArgs {
    /// The customer message.
    message: String,
    /// category or intent.
    #[arg(long, default_value = "category")]
    task: Task,
    /// zero-shot, few-shot (one example per label from validation, `--k`) or sft (with --adapter).
    /// Default: sft when --adapter is given, else zero-shot.
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// A fine-tuned adapter (PEFT folder).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Few-shot examples per label.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Labels shown.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Seed of the few-shot draw.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    if args.task == Task::Response {
        bail!("classify is for the category and intent tasks");
    }
    if args.message.trim().is_empty() {
        bail!("the message is empty");
    }
    let method_arg = args.method.unwrap_or(if args.adapter.is_some() {
        MethodArg::Sft
    } else {
        MethodArg::ZeroShot
    });
    let method = method_of(method_arg, args.adapter.as_deref(), &args.model)?;
    let examples = if method == Method::FewShot {
        let splits = load_splits(None, args.task)?;
        balanced_kshot(
            &splits.validation.records,
            &splits.test.records,
            args.task,
            args.k,
            args.seed,
        )?
    } else {
        Vec::new()
    };
    let model = load_model(&args.model, args.adapter.as_deref())?;
    let started = std::time::Instant::now();
    let mut dist = label_probabilities(
        &model,
        std::slice::from_ref(&args.message),
        args.task,
        method,
        &examples,
    )?
    .remove(0);
    dist.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (label, confidence) = dist[0];
    println!(
        "{label}  (confidence {:.1}%, {} {}, {:.2} s)",
        100.0 * confidence,
        args.task,
        method.as_str(),
        started.elapsed().as_secs_f64()
    );
    for (l, p) in dist.iter().take(args.top.max(1)) {
        println!("  {l:<24} {:>6.2}%", 100.0 * p);
    }
    Ok(())
}
