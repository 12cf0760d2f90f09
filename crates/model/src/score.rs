//! Scoring: the log-probability of candidate continuations after a prompt.
//!
//! A prefix shared by many prompts (system prompt + few-shot examples) is encoded once into a
//! [`PrefixCache`]; each item then runs only its own tokens and its candidates, as one tree-masked
//! pass after that cache.

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
///
/// One forward pass per item: the item's tokens and every candidate's tokens but its last are laid out
/// as a tree after the shared prefix (each candidate sees the prefix, the item and its own earlier
/// tokens, at the positions it would have alone), so the prefix's cache is neither recomputed nor
/// copied per candidate.
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
    let start = prefix.len;
    let mut tokens: Vec<u32> = item.to_vec();
    let mut positions: Vec<usize> = (start..start + item.len()).collect();
    // For each candidate token i >= 1, the tree row whose output predicts it.
    let mut rows: Vec<Vec<usize>> = Vec::with_capacity(candidates.len());
    let mut owner: Vec<Option<usize>> = vec![None; item.len()];
    for (ci, c) in candidates.iter().enumerate() {
        let mut r = Vec::with_capacity(c.len() - 1);
        for (i, &t) in c[..c.len() - 1].iter().enumerate() {
            r.push(tokens.len());
            tokens.push(t);
            positions.push(start + item.len() + i);
            owner.push(Some(ci));
        }
        rows.push(r);
    }
    let first = if tokens.is_empty() {
        prefix.next_logprobs.clone()
    } else {
        let n = tokens.len();
        let visible: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| match (owner[i], owner[j]) {
                        (_, None) => j <= i,
                        (Some(a), Some(b)) => a == b && j <= i,
                        (None, Some(_)) => false,
                    })
                    .collect()
            })
            .collect();
        let mut cache = prefix.cache.clone();
        let hidden = llama.forward_tree(&tokens, &positions, &visible, &mut cache)?;
        // Rows to read: the last item token (or the prefix's own next-token distribution) and every
        // candidate token but the last.
        let mut wanted: Vec<usize> = rows.iter().flatten().copied().collect();
        let item_row = item.len().checked_sub(1);
        if let Some(r) = item_row {
            wanted.push(r);
        }
        if wanted.is_empty() {
            prefix.next_logprobs.clone()
        } else {
            let [_, _, d] = hidden.dims();
            let idx: Vec<i64> = wanted.iter().map(|&r| r as i64).collect();
            let idx = burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(idx, [wanted.len()]),
                &llama.device,
            );
            let picked = hidden.reshape([n, d]).select(0, idx).unsqueeze_dim::<3>(0);
            let logp = to_vec(log_softmax(llama.logits(picked), 2))?;
            let vocab = llama.config.vocab_size;
            let row_of = |r: usize| wanted.iter().position(|&w| w == r).unwrap_or(0);
            let mut scores = Vec::with_capacity(candidates.len());
            let item_lp: Vec<f32> = match item_row {
                Some(r) => logp[row_of(r) * vocab..(row_of(r) + 1) * vocab].to_vec(),
                None => prefix.next_logprobs.clone(),
            };
            for (c, r) in candidates.iter().zip(&rows) {
                let mut s = item_lp[c[0] as usize];
                for (i, &tok) in c.iter().enumerate().skip(1) {
                    s += logp[row_of(r[i - 1]) * vocab + tok as usize];
                }
                scores.push(s);
            }
            return Ok(scores);
        }
    };
    Ok(candidates.iter().map(|c| first[c[0] as usize]).collect())
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
