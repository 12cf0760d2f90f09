//! The classification evaluator: one method, one decision rule, a list of records → predictions.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use supportlm_data::{Record, Task};
use supportlm_model::generate::{generate_after, GenerateOptions};
use supportlm_model::score::{encode_prefix, score_items};
use supportlm_model::Model;

use crate::error::Result;
use crate::extract::{extract_label, Extraction, EXTRACTION_FAILED};
use crate::prompt::{encode_prompts, label_candidates};

/// How the model is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    ZeroShot,
    FewShot,
    /// The model carries a fine-tuned adapter and gets the zero-shot prompt it was trained on.
    Sft,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ZeroShot => "zero-shot",
            Method::FewShot => "few-shot",
            Method::Sft => "sft",
        }
    }
}

/// How an answer becomes a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Greedy generation of a few tokens, then [`extract_label`].
    Generate,
    /// The label with the highest log-likelihood after the prompt.
    Constrained,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Generate => "generate",
            Decision::Constrained => "constrained",
        }
    }
}

/// Evaluator settings.
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub task: Task,
    pub method: Method,
    pub decision: Decision,
    /// Few-shot examples (earlier turns); empty for zero-shot and SFT.
    pub examples: Vec<Record>,
    /// Divide each label's log-likelihood by its token count (constrained rule).
    pub length_normalize: bool,
    /// New tokens for the generate rule.
    pub max_new_tokens: usize,
    /// Items per forward pass (scored together, or generated together).
    pub batch: usize,
}

/// One evaluated item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: usize,
    pub message: String,
    pub truth: String,
    pub prediction: String,
    /// The generated text (generate rule) or the best label (constrained rule).
    pub raw: String,
    /// Softmax over labels of their scores (constrained), 1 or 0 for generate (extracted or not).
    pub confidence: f64,
    pub extraction: Extraction,
}

impl Prediction {
    pub fn correct(&self) -> bool {
        self.truth == self.prediction
    }
}

/// Classifies `records`; `progress(done, total)` is called after each item. `model` must already
/// carry the adapter for [`Method::Sft`].
pub fn classify(
    model: &Model,
    records: &[Record],
    options: &ClassifyOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Prediction>> {
    let task = options.task;
    let labels = task.labels();
    let examples: &[Record] = if options.method == Method::FewShot {
        &options.examples
    } else {
        &[]
    };
    let prompts = encode_prompts(task, examples, records, &model.tokenizer, &model.template)?;
    let prefix = encode_prefix(model, &prompts.prefix)?;
    let started = Instant::now();
    let mut out = Vec::with_capacity(records.len());
    let mut push =
        |r: &Record, prediction: String, raw: String, confidence: f64, extraction: Extraction| {
            out.push(Prediction {
                id: r.id,
                message: r.instruction.clone(),
                truth: task.label_of(r).to_string(),
                prediction,
                raw,
                confidence,
                extraction,
            });
        };
    match options.decision {
        Decision::Constrained => {
            let candidates = label_candidates(&labels, &model.tokenizer)?;
            let chunk = options.batch.max(1);
            let mut done = 0;
            for (chunk_r, chunk_items) in records.chunks(chunk).zip(prompts.items.chunks(chunk)) {
                let all = score_items(model, &prefix, chunk_items, &candidates)?;
                for (r, mut scores) in chunk_r.iter().zip(all) {
                    if options.length_normalize {
                        scores
                            .iter_mut()
                            .zip(&candidates)
                            .for_each(|(s, c)| *s /= c.len() as f32);
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
                    let best = scores
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                        .map_or(0, |(j, _)| j);
                    let label = labels[best].to_string();
                    push(r, label.clone(), label, 1.0 / z, Extraction::Scored);
                }
                done += chunk_r.len();
                progress(done, records.len());
            }
        }
        Decision::Generate => {
            let opts = GenerateOptions {
                max_new_tokens: options.max_new_tokens,
                ..Default::default()
            };
            let mut done = 0;
            for (chunk_r, chunk_items) in records
                .chunks(options.batch.max(1))
                .zip(prompts.items.chunks(options.batch.max(1)))
            {
                let gens = generate_after(model, &prefix, chunk_items, &opts, &mut |_, _, _| {})?;
                for (r, g) in chunk_r.iter().zip(gens) {
                    let (label, how) = extract_label(&g.text, &labels);
                    let confidence = if label == EXTRACTION_FAILED { 0.0 } else { 1.0 };
                    push(r, label.to_string(), g.text, confidence, how);
                }
                done += chunk_r.len();
                progress(done, records.len());
            }
        }
    }
    tracing::info!(
        items = records.len(),
        seconds = started.elapsed().as_secs_f64(),
        method = options.method.as_str(),
        decision = options.decision.as_str(),
        "classified"
    );
    Ok(out)
}
