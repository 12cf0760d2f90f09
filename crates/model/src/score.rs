//! Scoring: the log-probability of candidate continuations after a prompt.
//!
//! A prefix shared by many prompts (system prompt + few-shot examples) is encoded once into a
//! [`PrefixCache`]; each item then runs only its own tokens and its candidates, as one tree-masked
//! pass after that cache.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::llama::{to_vec, StepInput};
use crate::model::Model;
use crate::sampling;

/// An encoded prefix: its KV cache and the log-probabilities of the token after it.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    /// Keys and values of the prefix.
    pub cache: KvCache,
    /// Log-probabilities of the token after the prefix.
    pub next_logprobs: Vec<f32>,
    /// Tokens in the prefix.
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
    Ok(score_items(model, prefix, &[item.to_vec()], candidates)?.remove(0))
}

/// [`score_candidates`] for several items at once: `result[i][c]` is the log-probability of candidate
/// `c` after the prefix and item `i`.
///
/// One forward pass for all of them: each item's tokens and every candidate's tokens but its last are
/// laid out as a tree after the shared prefix (an item sees the prefix and itself; a candidate sees
/// the prefix, its item and its own earlier tokens, at the positions it would have alone), so the
/// prefix is neither recomputed nor copied per item or candidate.
pub fn score_items(
    model: &Model,
    prefix: &PrefixCache,
    items: &[Vec<u32>],
    candidates: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    Ok(tree_pass(model, prefix, items, candidates)?.scores)
}

/// What one tree-masked pass of [`score_items`] leaves besides the scores, for continuing each item
/// (`generate::score_and_generate`): the cache (prefix, then every tree token), the cache positions of
/// each item's sequence (the prefix and the item's own tokens) and the log-probabilities of the token
/// after each item.
pub(crate) struct TreePass {
    pub scores: Vec<Vec<f32>>,
    pub cache: KvCache,
    pub item_positions: Vec<Vec<usize>>,
    pub next_logprobs: Vec<Vec<f32>>,
}

pub(crate) fn tree_pass(
    model: &Model,
    prefix: &PrefixCache,
    items: &[Vec<u32>],
    candidates: &[Vec<u32>],
) -> Result<TreePass> {
    if candidates.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("a candidate has no tokens".into()));
    }
    let llama = &model.llama;
    let start = prefix.len;
    let mut tokens: Vec<u32> = Vec::new();
    let mut positions: Vec<usize> = Vec::new();
    // Per token: (item, candidate or None for the item's own tokens).
    let mut owner: Vec<(usize, Option<usize>)> = Vec::new();
    // Per item: the row of its last token (None if empty), and per candidate the rows of its tokens
    // but the last.
    let mut last_row: Vec<Option<usize>> = Vec::with_capacity(items.len());
    let mut cand_rows: Vec<Vec<Vec<usize>>> = Vec::with_capacity(items.len());
    for (ii, item) in items.iter().enumerate() {
        for (i, &t) in item.iter().enumerate() {
            tokens.push(t);
            positions.push(start + i);
            owner.push((ii, None));
        }
        last_row.push(tokens.len().checked_sub(1).filter(|_| !item.is_empty()));
        let mut per_item = Vec::with_capacity(candidates.len());
        for (ci, c) in candidates.iter().enumerate() {
            let mut r = Vec::with_capacity(c.len() - 1);
            for (i, &t) in c[..c.len() - 1].iter().enumerate() {
                r.push(tokens.len());
                tokens.push(t);
                positions.push(start + item.len() + i);
                owner.push((ii, Some(ci)));
            }
            per_item.push(r);
        }
        cand_rows.push(per_item);
    }
    let vocab = llama.config.vocab_size;
    // Rows whose next-token distribution is needed.
    let wanted: Vec<usize> = last_row
        .iter()
        .flatten()
        .copied()
        .chain(cand_rows.iter().flatten().flatten().copied())
        .collect();
    let mut logp_of_row = std::collections::HashMap::new();
    let mut cache = prefix.cache.clone();
    if !tokens.is_empty() {
        let n = tokens.len();
        let visible: Vec<Vec<bool>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let ((ai, ac), (bi, bc)) = (owner[i], owner[j]);
                        ai == bi
                            && j <= i
                            && match (ac, bc) {
                                (_, None) => true,
                                (Some(x), Some(y)) => x == y,
                                (None, Some(_)) => false,
                            }
                    })
                    .collect()
            })
            .collect();
        let hidden = llama.forward_tree(&tokens, &positions, &visible, &mut cache)?;
        if !wanted.is_empty() {
            let [_, _, d] = hidden.dims();
            let idx: Vec<i64> = wanted.iter().map(|&r| r as i64).collect();
            let idx =
                Tensor::<1, Int>::from_data(TensorData::new(idx, [wanted.len()]), &llama.device);
            let picked = hidden.reshape([n, d]).select(0, idx).unsqueeze_dim::<3>(0);
            let logp = to_vec(log_softmax(llama.logits(picked), 2))?;
            for (k, &r) in wanted.iter().enumerate() {
                logp_of_row.insert(r, logp[k * vocab..(k + 1) * vocab].to_vec());
            }
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for (ii, rows) in cand_rows.iter().enumerate() {
        let first: &[f32] = match last_row[ii] {
            Some(r) => &logp_of_row[&r],
            None => &prefix.next_logprobs,
        };
        let scores = candidates
            .iter()
            .zip(rows)
            .map(|(c, r)| {
                first[c[0] as usize]
                    + c.iter()
                        .enumerate()
                        .skip(1)
                        .map(|(i, &tok)| logp_of_row[&r[i - 1]][tok as usize])
                        .sum::<f32>()
            })
            .collect();
        out.push(scores);
    }
    let item_positions = (0..items.len())
        .map(|ii| {
            let own = owner
                .iter()
                .enumerate()
                .filter(|(_, &o)| o == (ii, None))
                .map(|(row, _)| start + row);
            (0..start).chain(own).collect()
        })
        .collect();
    let next_logprobs = last_row
        .iter()
        .map(|r| match r {
            Some(r) => logp_of_row[r].clone(),
            None => prefix.next_logprobs.clone(),
        })
        .collect();
    Ok(TreePass {
        scores: out,
        cache,
        item_positions,
        next_logprobs,
    })
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
