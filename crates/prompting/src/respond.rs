//! Task 2: writing the support response with a prompting method or an SFT model, and scoring the
//! responses against the references (ROUGE, BLEU, chrF, embedding cosine, degeneration).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use supportlm_data::{Record, Task};
use supportlm_metrics::degeneration::{self, Degeneration};
use supportlm_metrics::intervals::{bootstrap_ci, Interval};
use supportlm_metrics::text::{
    corpus_bleu, corpus_chrf, rouge_stemmed, sentence_bleu, sentence_chrf,
};
use supportlm_model::generate::{generate_after, GenerateOptions, Generation, StopReason};
use supportlm_model::sampling::SamplingConfig;
use supportlm_model::score::encode_prefix;
use supportlm_model::Model;

use crate::classify::Method;
use crate::error::{PromptError, Result};
use crate::prompt::encode_prompts;

/// Generation settings.
#[derive(Debug, Clone)]
pub struct RespondOptions {
    /// How the model is prompted (or the adapter's SFT prompt).
    pub method: Method,
    /// Few-shot examples (one per category); ignored unless the method is few-shot.
    pub examples: Vec<Record>,
    /// Generation budget per response.
    pub max_new_tokens: usize,
    /// Greedy by default.
    pub sampling: SamplingConfig,
    /// Items generated together.
    pub batch: usize,
}

/// One generated response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The record's id.
    pub id: usize,
    /// The customer message.
    pub message: String,
    /// The message's category (given to the prompt).
    pub category: String,
    /// The dataset's response.
    pub reference: String,
    /// The model's response.
    pub generated: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Seconds for the batch this item was generated in, divided by its size.
    pub seconds: f64,
    /// Why generation stopped.
    pub stop: StopReason,
}

/// Generates responses for `records` (which must have reference responses); `progress(done, total)`
/// after each batch. `model` must already carry the adapter for [`Method::Sft`].
pub fn respond(
    model: &Model,
    records: &[Record],
    options: &RespondOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Response>> {
    if let Some(r) = records.iter().find(|r| r.response.is_none()) {
        return Err(PromptError::Prompt(format!(
            "record {} has no reference response; Task 2 needs the complete rows",
            r.id
        )));
    }
    let replies = reply(model, records, options, progress)?;
    Ok(records
        .iter()
        .zip(replies)
        .map(|(r, (g, seconds))| Response {
            id: r.id,
            message: r.instruction.clone(),
            category: r.category.to_string(),
            reference: r.response.clone().unwrap_or_default(),
            generated: g.text.trim().to_string(),
            tokens: g.tokens.len(),
            seconds,
            stop: g.stop,
        })
        .collect())
}

/// The model's reply to each record's message (given its category), with the seconds of the batch
/// it was generated in divided by the batch's size; no reference response is needed.
pub fn reply(
    model: &Model,
    records: &[Record],
    options: &RespondOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(Generation, f64)>> {
    let examples: &[Record] = if options.method == Method::FewShot {
        &options.examples
    } else {
        &[]
    };
    let prompts = encode_prompts(
        Task::Response,
        examples,
        records,
        &model.tokenizer,
        &model.template,
    )?;
    let prefix = encode_prefix(model, &prompts.prefix)?;
    let opts = GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        sampling: options.sampling.clone(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(records.len());
    let batch = options.batch.max(1);
    for chunk in prompts.items.chunks(batch) {
        let t = Instant::now();
        let gens = generate_after(model, &prefix, chunk, &opts, &mut |_, _, _| {})?;
        let per_item = t.elapsed().as_secs_f64() / chunk.len() as f64;
        out.extend(gens.into_iter().map(|g| (g, per_item)));
        progress(out.len(), records.len());
    }
    Ok(out)
}

/// Per-item scores of one response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ItemScores {
    /// ROUGE-1 F (stemmed).
    pub rouge1: f64,
    /// ROUGE-2 F (stemmed).
    pub rouge2: f64,
    /// ROUGE-L F (stemmed).
    pub rouge_l: f64,
    /// ROUGE-Lsum F (stemmed).
    pub rouge_lsum: f64,
    /// Sentence BLEU (sacrebleu's conventions).
    pub bleu: f64,
    /// Sentence chrF.
    pub chrf: f64,
    /// Cosine of the sentence embeddings of response and reference, when an encoder was given.
    pub cosine: Option<f64>,
}

/// Overlap scores of every response (ROUGE with stemming, as rouge-score's `use_stemmer=True`).
pub fn item_scores(responses: &[Response], cosines: Option<&[f64]>) -> Vec<ItemScores> {
    responses
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rouge = rouge_stemmed(&r.generated, &r.reference);
            ItemScores {
                rouge1: rouge.rouge1.f,
                rouge2: rouge.rouge2.f,
                rouge_l: rouge.rouge_l.f,
                rouge_lsum: rouge.rouge_lsum.f,
                bleu: sentence_bleu(&r.generated, &r.reference),
                chrf: sentence_chrf(&r.generated, &r.reference),
                cosine: cosines.and_then(|c| c.get(i).copied()),
            }
        })
        .collect()
}

/// Counts of degenerate responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DegenerationCounts {
    /// Empty responses.
    pub empty: usize,
    /// Responses that loop.
    pub repetition: usize,
    /// Responses that leak the prompt or template tokens.
    pub leak: usize,
    /// Responses cut at `max_new_tokens`.
    pub truncated: usize,
}

/// Aggregates of a response run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RespondMetrics {
    /// Items scored.
    pub items: usize,
    /// Means over items with 95% bootstrap intervals.
    pub rouge1: Interval,
    /// ROUGE-2 F.
    pub rouge2: Interval,
    /// ROUGE-L F.
    pub rouge_l: Interval,
    /// ROUGE-Lsum F.
    pub rouge_lsum: Interval,
    /// Sentence BLEU.
    pub sentence_bleu: Interval,
    /// Sentence chrF.
    pub sentence_chrf: Interval,
    /// MiniLM cosine to the reference (`None` without an embedder).
    pub cosine: Option<Interval>,
    /// Corpus BLEU.
    pub corpus_bleu: f64,
    /// Corpus chrF.
    pub corpus_chrf: f64,
    /// Mean tokens generated.
    pub mean_tokens: f64,
    /// Degenerate responses by kind.
    pub degeneration: DegenerationCounts,
}

/// Whether a response is degenerate: empty, looping, or leaking the prompt or template.
pub fn degeneration_of(r: &Response, model: &Model) -> Degeneration {
    let markers = leak_markers(model);
    let refs: Vec<&str> = markers.iter().map(String::as_str).collect();
    degeneration::check(&r.generated, &refs)
}

/// What a reply must not contain: the model's end-of-text tokens, ChatML's control tokens, the start
/// of Task 2's system prompt and the prompt's scaffolding.
pub fn leak_markers(model: &Model) -> Vec<String> {
    let mut markers: Vec<String> = model
        .tokenizer
        .eos_ids
        .iter()
        .filter_map(|&id| model.tokenizer.inner().id_to_token(id))
        .collect();
    markers.extend(["<|im_start|>".to_string(), "<|im_end|>".to_string()]);
    let system = Task::Response.system_prompt();
    markers.push(system.chars().take(48).collect());
    markers.push("Customer message:".into());
    markers
}

/// Aggregates item scores (bootstrap over items with `seed`).
pub fn aggregate(
    responses: &[Response],
    scores: &[ItemScores],
    degenerations: &[Degeneration],
    resamples: usize,
    seed: u64,
) -> RespondMetrics {
    let n = scores.len();
    let mean_of = |f: &dyn Fn(&ItemScores) -> f64| {
        bootstrap_ci(n, resamples, 0.95, seed, |idx| {
            idx.iter().map(|&i| f(&scores[i])).sum::<f64>() / idx.len().max(1) as f64
        })
    };
    let hyps: Vec<&str> = responses.iter().map(|r| r.generated.as_str()).collect();
    let refs: Vec<&str> = responses.iter().map(|r| r.reference.as_str()).collect();
    let mut counts = DegenerationCounts::default();
    for d in degenerations {
        counts.empty += usize::from(d.empty);
        counts.repetition += usize::from(d.repetition);
        counts.leak += usize::from(d.leak);
    }
    counts.truncated = responses
        .iter()
        .filter(|r| r.stop == StopReason::MaxTokens)
        .count();
    RespondMetrics {
        items: n,
        rouge1: mean_of(&|s| s.rouge1),
        rouge2: mean_of(&|s| s.rouge2),
        rouge_l: mean_of(&|s| s.rouge_l),
        rouge_lsum: mean_of(&|s| s.rouge_lsum),
        sentence_bleu: mean_of(&|s| s.bleu),
        sentence_chrf: mean_of(&|s| s.chrf),
        cosine: scores
            .iter()
            .all(|s| s.cosine.is_some())
            .then(|| mean_of(&|s| s.cosine.unwrap_or(0.0))),
        corpus_bleu: corpus_bleu(&hyps, &refs),
        corpus_chrf: corpus_chrf(&hyps, &refs),
        mean_tokens: responses.iter().map(|r| r.tokens as f64).sum::<f64>() / n.max(1) as f64,
        degeneration: counts,
    }
}
