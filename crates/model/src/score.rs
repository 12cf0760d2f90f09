//! Scoring: the log-probability of candidate continuations after a prompt.
//!
//! A prefix shared by many prompts (system prompt + few-shot examples) is encoded once into a
//! [`PrefixCache`]; each item then runs only its own tokens on a copy of that cache, and all candidates of
//! an item are scored in one batch on the item's cache repeated per candidate.

use burn::tensor::activation::log_softmax;

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::llama::{to_vec, StepInput};
use crate::model::Model;
use crate::sampling;

/// An encoded prefix: its KV cache and the log-probabilities of the token after it.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    pub cache: KvCache,
    pub next_logprobs: Vec<f32>,
    pub len: usize,
}

/// Encodes a prefix once for reuse.
pub fn encode_prefix(model: &Model, prefix: &[u32]) -> Result<PrefixCache> {
    if prefix.is_empty() {
        return Err(ModelError::Input("empty prefix".into()));
    }
    let mut cache = model.llama.new_cache(1);
    let logits = model
        .llama
        .forward_last(&StepInput::dense(vec![prefix.to_vec()]), &mut cache)?;
    Ok(PrefixCache {
        cache,
        next_logprobs: sampling::log_softmax(&to_vec(logits)?),
        len: prefix.len(),
    })
}

/// Total log-probability of each candidate after `prefix` (already encoded) followed by `item` tokens.
/// Every candidate must have at least one token.
pub fn score_candidates(
    model: &Model,
    prefix: &PrefixCache,
    item: &[u32],
    candidates: &[Vec<u32>],
) -> Result<Vec<f32>> {
    if candidates.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("a candidate has no tokens".into()));
    }
    let llama = &model.llama;
    let mut cache = prefix.cache.clone();
    let first = if item.is_empty() {
        prefix.next_logprobs.clone()
    } else {
        let logits = llama.forward_last(&StepInput::dense(vec![item.to_vec()]), &mut cache)?;
        sampling::log_softmax(&to_vec(logits)?)
    };
    let mut scores: Vec<f32> = candidates.iter().map(|c| first[c[0] as usize]).collect();
    let rest = candidates.iter().map(|c| c.len() - 1).max().unwrap_or(0);
    if rest == 0 {
        return Ok(scores);
    }
    // Feed every candidate but its last token, right-padded; read the log-prob of each next token.
    let n = candidates.len();
    let pad = candidates[0][0];
    let mut input = StepInput {
        tokens: Vec::with_capacity(n),
        valid: Vec::with_capacity(n),
    };
    for c in candidates {
        let body = &c[..c.len() - 1];
        input.tokens.push(
            body.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, rest - body.len()))
                .collect(),
        );
        input
            .valid
            .push((0..rest).map(|i| i < body.len()).collect());
    }
    let mut batch_cache = cache.repeat(n);
    let hidden = llama.forward_hidden(&input, &mut batch_cache, None)?;
    let logp = log_softmax(llama.logits(hidden), 2);
    let vocab = llama.config.vocab_size;
    let values = to_vec(logp)?;
    for (row, c) in candidates.iter().enumerate() {
        for (i, &tok) in c.iter().enumerate().skip(1) {
            scores[row] += values[(row * rest + i - 1) * vocab + tok as usize];
        }
    }
    Ok(scores)
}

/// Log-probability of `continuation` after `context`, in one pass from scratch (no reuse). The reference
/// that prefix reuse is tested against.
pub fn sequence_logprob(model: &Model, context: &[u32], continuation: &[u32]) -> Result<f32> {
    if context.is_empty() || continuation.is_empty() {
        return Err(ModelError::Input(
            "context and continuation need at least one token".into(),
        ));
    }
    let llama = &model.llama;
    let tokens: Vec<u32> = context
        .iter()
        .chain(&continuation[..continuation.len() - 1])
        .copied()
        .collect();
    let mut cache = llama.new_cache(1);
    let hidden = llama.forward_hidden(&StepInput::dense(vec![tokens.clone()]), &mut cache, None)?;
    let logp = log_softmax(llama.logits(hidden), 2);
    let vocab = llama.config.vocab_size;
    let values = to_vec(logp)?;
    Ok(continuation
        .iter()
        .enumerate()
        .map(|(i, &tok)| values[(context.len() - 1 + i) * vocab + tok as usize])
        .sum())
}
