//! `supportlm eval respond`: Task 2 with a prompting method or an SFT model: generate the responses,
//! score them against the references (ROUGE, BLEU, chrF, embedding cosine, degeneration) and have a
//! judge rate a seeded subset with the study's rubric. Resumable like `eval classify`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use supportlm_data::kshot::balanced_kshot;
use supportlm_data::{Category, Record, SplitName, Task};
use supportlm_metrics::degeneration::Degeneration;
use supportlm_metrics::intervals::Z95;
use supportlm_metrics::wilson_interval;
use supportlm_model::bert::{cosine, SentenceEncoder};
use supportlm_model::sampling::SamplingConfig;
use supportlm_model::Model;
use supportlm_prompting::classify::LabelScorer;
use supportlm_prompting::judge::{summarize, HttpJudge, Judge, Verdict};
use supportlm_prompting::report::{
    CategoryChain, GenerationSpeed, RespondRunMetrics, RespondSettings, ScoredResponse,
};
use supportlm_prompting::respond::{
    aggregate, degeneration_of, item_scores, respond, RespondOptions, Response,
};
use supportlm_prompting::Method;

use crate::resume::{claim_folder, item_bar, run_chunks, write_jsonl};
use crate::shared::{load_model, load_splits, method_of, sample, MethodArg, DEFAULT_MODEL};

/// Where `cargo xtask setup` puts the sentence encoder.
pub const DEFAULT_EMBEDDER: &str = "checkpoints/embed/all-MiniLM-L6-v2";

/// `--method` of `eval respond`: the language model's methods, or the classical baseline.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RespondMethod {
    ZeroShot,
    FewShot,
    Sft,
    /// The reply of the most similar training message of the same category (TF-IDF cosine), cut to
    /// --max-new-tokens: no language model writes anything.
    Retrieval,
}

#[derive(Args)]
pub struct RespondArgs {
    #[arg(long, value_enum)]
    method: RespondMethod,
    /// The fine-tuned adapter (PEFT format) for --method sft (a fully fine-tuned model is given as
    /// --model instead).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// A split folder from `supportlm data split --task response` (default: the shipped data).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    split: SplitName,
    /// Items, drawn with --seed (the same items for every method).
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Seed for the item draw, the few-shot draw, the judged subset and the bootstrap.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Few-shot examples per category (from validation).
    #[arg(long, default_value_t = 1)]
    k: usize,
    #[arg(long, default_value_t = 160)]
    max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sentence encoder folder for the embedding cosine.
    #[arg(long, default_value = DEFAULT_EMBEDDER)]
    embedder: PathBuf,
    /// Judge: `none`, or a model this project loads (GGUF file or Hugging Face folder; by default the
    /// base model, without any adapter). Ignored when --judge-url is given.
    #[arg(long, default_value = DEFAULT_MODEL)]
    judge: String,
    /// Let a local judge write its answer freely (parsed afterwards) instead of scoring each
    /// criterion's values.
    #[arg(long)]
    judge_generate: bool,
    /// An OpenAI-compatible endpoint for the judge (e.g. http://localhost:8000/v1).
    #[arg(long)]
    judge_url: Option<String>,
    /// The endpoint's model name.
    #[arg(long, default_value = "gpt-4o-mini")]
    judge_model: String,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    judge_key_env: String,
    /// Judged items (a seeded subset of the evaluated ones, the same for every method).
    #[arg(long, default_value_t = 50)]
    judge_items: usize,
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// The chain the demo runs: classify each message with this Task 1 (category) adapter and write
    /// the reply for the predicted category instead of the dataset's (the accuracy of those
    /// categories is reported beside the reply scores).
    #[arg(long)]
    category_adapter: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

/// The category `adapter` gives each record's message (its most probable label under constrained
/// scoring, as `eval classify --method sft` and the server's `/api/process` decide).
fn predict_categories(
    model: &Path,
    adapter: &Path,
    records: &[Record],
) -> anyhow::Result<Vec<Category>> {
    let classifier = load_model(model, Some(adapter))?;
    let messages: Vec<String> = records.iter().map(|r| r.instruction.clone()).collect();
    let bar = item_bar(messages.len(), "categories");
    let mut out = Vec::with_capacity(messages.len());
    let mut scorer = LabelScorer::new(&classifier, Task::Category, Method::Sft, &[])?;
    for chunk in messages.chunks(16) {
        let dists = scorer.probabilities(chunk)?;
        for d in dists {
            let best = d
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(label, _)| *label)
                .context("no category scored")?;
            out.push(
                best.parse::<Category>()
                    .map_err(|all| anyhow::anyhow!("{best} is not one of {all}"))?,
            );
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Task 2's classical baseline: for each record, the reply of the training message most similar to
/// its message (TF-IDF cosine) among the training messages of its category (the category the
/// language model is given: the dataset's, or the one the chain predicted), cut to `max_tokens` tokens
/// as generation would be. A message sharing no term with its category's messages gets that
/// category's first training reply.
fn retrieve(
    train: &[Record],
    records: &[Record],
    model: &Model,
    max_tokens: usize,
) -> anyhow::Result<Vec<Response>> {
    use supportlm_baseline::retrieval::Nearest;
    use supportlm_model::generate::StopReason;

    let started = Instant::now();
    let texts: Vec<&str> = train.iter().map(|r| r.instruction.as_str()).collect();
    let index = Nearest::fit(&texts, 1, usize::MAX)?;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let same = |i: usize| train[i].category == r.category;
        let best = index
            .nearest(&r.instruction, same)
            .map(|(i, _)| i)
            .or_else(|| index.first(same))
            .with_context(|| format!("no training reply of category {}", r.category.as_str()))?;
        let reply = train[best]
            .response
            .as_deref()
            .with_context(|| format!("training record {} has no response", train[best].id))?;
        let ids = model.tokenizer.encode(reply, false)?;
        let (text, tokens, stop) = if ids.len() > max_tokens {
            let text = model.tokenizer.decode(&ids[..max_tokens])?;
            (text, max_tokens, StopReason::MaxTokens)
        } else {
            (reply.to_string(), ids.len(), StopReason::Eos)
        };
        out.push(Response {
            id: r.id,
            message: r.instruction.clone(),
            category: r.category.to_string(),
            reference: r
                .response
                .clone()
                .with_context(|| format!("test record {} has no reference response", r.id))?,
            generated: text,
            tokens,
            seconds: 0.0,
            stop,
        });
    }
    let per_item = started.elapsed().as_secs_f64() / records.len().max(1) as f64;
    out.iter_mut().for_each(|r| r.seconds = per_item);
    Ok(out)
}

pub fn run(args: RespondArgs) -> anyhow::Result<()> {
    let method = match args.method {
        RespondMethod::ZeroShot => Some(MethodArg::ZeroShot),
        RespondMethod::FewShot => Some(MethodArg::FewShot),
        RespondMethod::Sft => Some(MethodArg::Sft),
        RespondMethod::Retrieval if args.adapter.is_some() => {
            bail!("--adapter goes with --method sft, not retrieval")
        }
        RespondMethod::Retrieval => None,
    }
    .map(|m| method_of(m, args.adapter.as_deref(), &args.model))
    .transpose()?;
    let method_name = method.map_or("retrieval", Method::as_str);
    let splits = load_splits(args.data.as_deref(), Task::Response)?;
    let records = sample(&splits.get(args.split).records, Some(args.limit), args.seed);
    let (records, chain) = match &args.category_adapter {
        Some(dir) => {
            let predicted = predict_categories(&args.model, dir, &records)?;
            let right = records
                .iter()
                .zip(&predicted)
                .filter(|(r, p)| r.category == **p)
                .count();
            let chain = CategoryChain {
                adapter: dir.display().to_string(),
                items: records.len(),
                accuracy: wilson_interval(right, records.len(), Z95),
            };
            let records = records
                .into_iter()
                .zip(predicted)
                .map(|(r, category)| Record { category, ..r })
                .collect();
            (records, Some(chain))
        }
        None => (records, None),
    };
    let model = load_model(&args.model, args.adapter.as_deref())?;
    let examples = if method == Some(Method::FewShot) {
        balanced_kshot(
            &splits.validation.records,
            &splits.test.records,
            Task::Response,
            args.k,
            args.seed,
        )?
    } else {
        Vec::new()
    };
    let options = method.map(|method| RespondOptions {
        method,
        examples,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            seed: args.seed,
            ..Default::default()
        },
        batch: 8,
    });
    let settings = RespondSettings {
        task: "response".into(),
        method: method_name.into(),
        model: args.model.display().to_string(),
        adapter: args.adapter.as_ref().map(|a| a.display().to_string()),
        split: args.split.as_str().into(),
        limit: args.limit,
        k: args.k,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        prompts: supportlm_data::prompts::sha256().to_string(),
        category_adapter: args
            .category_adapter
            .as_ref()
            .map(|a| a.display().to_string()),
    };
    claim_folder(&args.out, &serde_json::to_value(&settings)?)?;

    // 1. Responses (resumable).
    let partial = args.out.join("responses.partial.jsonl");
    let bar = item_bar(records.len(), "responses");
    let started = Instant::now();
    let (responses, timed) = match &options {
        Some(options) => run_chunks(
            &partial,
            &records,
            32,
            |r: &Response| r.id,
            &bar,
            &mut |chunk, progress| Ok(respond(&model, chunk, options, &mut |n, _| progress(n))?),
        )?,
        None => {
            let replies = retrieve(&splits.train.records, &records, &model, args.max_new_tokens)?;
            bar.finish_and_clear();
            let n = replies.len();
            (replies, n)
        }
    };
    let gen_seconds = started.elapsed().as_secs_f64();

    // 2. Overlap and embedding scores, degeneration.
    let cosines = if args.embedder.as_os_str() == "none" {
        None
    } else {
        let encoder = SentenceEncoder::load(&args.embedder, &crate::shared::device()?).with_context(|| {
            format!(
                "loading the sentence encoder from {} (run `cargo xtask setup`, or pass --embedder none)",
                args.embedder.display()
            )
        })?;
        let mut out = Vec::with_capacity(responses.len());
        for chunk in responses.chunks(16) {
            let texts: Vec<&str> = chunk
                .iter()
                .flat_map(|r| [r.generated.as_str(), r.reference.as_str()])
                .collect();
            let emb = encoder.embed(&texts)?;
            out.extend(emb.chunks(2).map(|p| cosine(&p[0], &p[1]) as f64));
        }
        Some(out)
    };
    let scores = item_scores(&responses, cosines.as_deref());
    let degenerations: Vec<Degeneration> = responses
        .iter()
        .map(|r| degeneration_of(r, &model))
        .collect();
    let summary = aggregate(
        &responses,
        &scores,
        &degenerations,
        args.bootstrap,
        args.seed,
    );
    let lines: Vec<ScoredResponse> = responses
        .iter()
        .zip(&scores)
        .zip(&degenerations)
        .map(|((r, s), d)| ScoredResponse {
            response: r.clone(),
            scores: *s,
            degeneration: *d,
        })
        .collect();
    write_jsonl(&args.out.join("predictions.jsonl"), &lines)?;
    drop(model);

    // 3. The judge on a seeded subset (the same items for every method).
    let judge_model = match (&args.judge_url, args.judge.as_str()) {
        (None, "none") | (Some(_), _) => None,
        (None, path) => Some(
            Model::load(Path::new(path), &crate::shared::device()?)
                .with_context(|| format!("loading the judge {path}"))?,
        ),
    };
    let judge = match (&args.judge_url, &judge_model) {
        (Some(url), _) => Some(Judge::Http(HttpJudge {
            url: url.clone(),
            model: args.judge_model.clone(),
            api_key: std::env::var(&args.judge_key_env).ok(),
            timeout: Duration::from_secs(120),
        })),
        (None, Some(m)) => Some(Judge::Local {
            model: m,
            name: args.judge.clone(),
            constrained: !args.judge_generate,
        }),
        (None, None) => None,
    };
    let judged = match &judge {
        Some(judge) => {
            let picked = sample(&records, Some(args.judge_items), args.seed ^ 0x6a75_6467);
            let by_id: std::collections::HashMap<usize, &Response> =
                responses.iter().map(|r| (r.id, r)).collect();
            let bar = item_bar(picked.len(), "judged");
            let (verdicts, _) = run_chunks(
                &args.out.join("judge.partial.jsonl"),
                &picked,
                5,
                |v: &Verdict| v.id,
                &bar,
                &mut |chunk, progress| {
                    let mut out = Vec::new();
                    for r in chunk {
                        let response = by_id
                            .get(&r.id)
                            .with_context(|| format!("no response for item {}", r.id))?;
                        out.push(judge.judge(response)?);
                        progress(out.len());
                    }
                    Ok(out)
                },
            )?;
            write_jsonl(&args.out.join("judge.jsonl"), &verdicts)?;
            let note = match &judge_model {
                Some(m) if m.llama.config.num_params() < 1_000_000_000 => format!(
                    "The judge is {}, a small model ({:.0}M parameters): its ratings are weak evidence \
                     (they mostly reflect whether it follows the rubric's format), not a quality verdict.",
                    args.judge,
                    m.llama.config.num_params() as f64 / 1e6
                ),
                Some(m) => format!(
                    "The judge is {} ({:.1}B parameters), run locally.",
                    args.judge,
                    m.llama.config.num_params() as f64 / 1e9
                ),
                None => format!("The judge is {}.", judge.name()),
            };
            Some((
                summarize(judge.name(), &verdicts, args.bootstrap, args.seed),
                note,
            ))
        }
        None => None,
    };

    let out = RespondRunMetrics {
        settings,
        generation: GenerationSpeed {
            seconds: gen_seconds,
            items_timed: timed,
            items_per_s: if gen_seconds > 0.0 {
                timed as f64 / gen_seconds
            } else {
                0.0
            },
        },
        scores: summary,
        judge: judged.as_ref().map(|(s, _)| s.clone()),
        judge_note: judged.as_ref().map(|(_, n)| n.clone()),
        chain,
    };
    let summary = &out.scores;
    supportlm_data::fsio::write_atomic(
        &args.out.join("metrics.json"),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    for f in ["responses.partial.jsonl", "judge.partial.jsonl"] {
        let _ = std::fs::remove_file(args.out.join(f));
    }
    println!(
        "response {}: ROUGE-L {:.4} [{:.4}, {:.4}], BLEU {:.2}, chrF {:.2}, cosine {}, degenerate {} empty / {} looping / {} leaking of {}",
        method_name,
        summary.rouge_l.estimate,
        summary.rouge_l.low,
        summary.rouge_l.high,
        summary.corpus_bleu,
        summary.corpus_chrf,
        summary
            .cosine
            .map_or("-".into(), |c| format!("{:.4} [{:.4}, {:.4}]", c.estimate, c.low, c.high)),
        summary.degeneration.empty,
        summary.degeneration.repetition,
        summary.degeneration.leak,
        summary.items
    );
    if let Some((s, note)) = &judged {
        let total = s.total.map_or("no parseable verdict".into(), |t| {
            format!("{:.2}/10 [{:.2}, {:.2}]", t.estimate, t.low, t.high)
        });
        println!(
            "judge: total {total} over {} items ({} unparseable). {note}",
            s.items, s.unparseable
        );
    }
    println!("written to {}", args.out.display());
    Ok(())
}
