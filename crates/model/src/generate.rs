//! Text generation: batched prompts (left-padded, masked) prefilled by [`crate::llama`], then token by token
//! (on the CPU, the quantized decode path of [`crate::decode`] with its own KV cache; on a GPU device, the
//! Burn model with its KV cache on the device, greedy choices made there); stop conditions (EOS / end of
//! turn, stop strings, max new tokens) and a per-token streaming callback.

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::decode::DecodeState;
use crate::error::{ModelError, Result};
use crate::llama::{to_vec, StepInput};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingConfig};
use crate::score::PrefixCache;

use burn::tensor::{Int, Tensor};

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Tokens to generate at most, per prompt.
    pub max_new_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingConfig,
    /// Generation stops when the text contains one of these (the stop string is not returned).
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: SamplingConfig::default(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence or end-of-turn token.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The caller stopped it (see [`generate_controlled`]).
    Cancelled,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids (without the stopping EOS token).
    pub tokens: Vec<u32>,
    /// The generated text (stop string cut off).
    pub text: String,
    /// Why generation stopped.
    pub stop: StopReason,
}

/// Generates a continuation for each prompt. `on_token(row, id, new_text)` is called for every token as it
/// is produced (`new_text` is the newly decodable text, possibly empty mid-character).
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str),
) -> Result<Vec<Generation>> {
    generate_controlled(model, prompts, options, &mut always(on_token))
}

/// [`generate`] where the caller may stop a row: `on_token` returns `false` to end that row's
/// generation after this token (its [`StopReason`] is then `Cancelled`); the other rows go on. A server
/// uses it for per-request token limits and stop strings in a shared batch, and for clients that went
/// away.
pub fn generate_controlled(
    model: &Model,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("a prompt has no tokens".into()));
    }
    let input = left_padded(prompts, pad_id(model));
    let cache = model.llama.new_cache(prompts.len());
    continue_generation(model, cache, 0, &input, options, on_token)
}

/// Adapts a streaming callback to the controlled form (never stops a row).
fn always(on_token: &mut dyn FnMut(usize, u32, &str)) -> impl FnMut(usize, u32, &str) -> bool + '_ {
    move |row, id, text| {
        on_token(row, id, text);
        true
    }
}

/// Generates a continuation for each item after a shared, already encoded prefix (e.g. the system
/// prompt and few-shot examples): the prefix is neither recomputed nor re-tokenized per item.
pub fn generate_after(
    model: &Model,
    prefix: &PrefixCache,
    items: &[Vec<u32>],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str),
) -> Result<Vec<Generation>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    if items.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("an item has no tokens".into()));
    }
    // Left padding between the prefix and each item: masked out, and positions count real tokens only.
    let input = left_padded(items, pad_id(model));
    let cache = prefix.cache.repeat(items.len());
    continue_generation(
        model,
        cache,
        prefix.len,
        &input,
        options,
        &mut always(on_token),
    )
}

/// Scores `candidates` after each item (as [`crate::score::score_items`]) and generates a continuation
/// of each item, from one pass: the tree-masked scoring pass already runs every item's tokens after the
/// prefix, so its keys and values and the distribution after each item seed the decode path, and no
/// item is prefilled twice. The first token is drawn from log-probabilities rather than logits (the
/// same distribution; the same greedy choice).
pub fn score_and_generate(
    model: &Model,
    prefix: &PrefixCache,
    items: &[Vec<u32>],
    candidates: &[Vec<u32>],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str),
) -> Result<Vec<(Vec<f32>, Generation)>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let pass = crate::score::tree_pass(model, prefix, items, candidates)?;
    let next_pos = items.iter().map(|i| prefix.len + i.len()).collect();
    let steps = if crate::device::is_cpu(&model.llama.device) {
        let state = DecodeState::from_positions(
            &pass.cache,
            &model.llama.config,
            &pass.item_positions,
            next_pos,
        )?;
        Steps::Host(state)
    } else {
        Steps::Device(pass.cache.gather(&pass.item_positions, next_pos))
    };
    let first = Logits::Host(pass.next_logprobs);
    let generations = decode(model, first, steps, options, &mut always(on_token))?;
    Ok(pass.scores.into_iter().zip(generations).collect())
}

/// Rows left-padded to the longest, so every row's last token sits in the same column.
fn left_padded(rows: &[Vec<u32>], pad: u32) -> StepInput {
    let max_len = rows.iter().map(Vec::len).max().unwrap_or(0);
    StepInput {
        tokens: rows
            .iter()
            .map(|r| {
                std::iter::repeat_n(pad, max_len - r.len())
                    .chain(r.iter().copied())
                    .collect()
            })
            .collect(),
        valid: rows
            .iter()
            .map(|r| crate::cache::left_padding_mask(r.len(), max_len))
            .collect(),
    }
}

fn pad_id(model: &Model) -> u32 {
    model
        .tokenizer
        .pad_id
        .or(model.tokenizer.eos_ids.first().copied())
        .unwrap_or(0)
}

/// Where the decode steps run: on the CPU, the quantized host kernels ([`crate::decode`]) over a host
/// copy of the KV cache; on another device, the Burn model with its KV cache kept there.
enum Steps {
    Host(DecodeState),
    Device(KvCache),
}

/// The next-token distributions of a step, one row per sequence: on the host, or a `[b, vocab]` tensor
/// on the device (tokens are then chosen there and only their ids read back).
enum Logits {
    Host(Vec<Vec<f32>>),
    // Boxed: a GPU backend's tensor handle is hundreds of bytes.
    Device(Box<Tensor<2>>),
}

impl Logits {
    /// The next token of every row that is not `done` (`None` for the others), each row drawn by its
    /// own sampler.
    fn pick(
        self,
        samplers: &mut [Sampler],
        config: &SamplingConfig,
        done: &[bool],
    ) -> Result<Vec<Option<u32>>> {
        match self {
            Logits::Host(rows) => Ok(rows
                .iter()
                .zip(samplers.iter_mut())
                .zip(done)
                .map(|((logits, sampler), &d)| (!d).then(|| sampler.sample(logits)))
                .collect()),
            Logits::Device(t) if samplers.iter().all(Sampler::is_greedy) => {
                let rows = t.dims()[0];
                read_ids(t.argmax(1).reshape([rows]), done)
            }
            Logits::Device(t) => {
                // Each row's own draw (a done row draws nothing, as on the host).
                let uniform: Vec<f64> = samplers
                    .iter_mut()
                    .zip(done)
                    .map(|(s, &d)| if d { None } else { s.next_uniform() })
                    .map(|u| u.unwrap_or(0.0))
                    .collect();
                read_ids(
                    crate::sampling::sample_on_device(*t, config, &uniform),
                    done,
                )
            }
        }
    }
}

/// Token ids chosen on the device, read back: the only values a decoding step on a GPU returns.
fn read_ids(ids: Tensor<1, Int>, done: &[bool]) -> Result<Vec<Option<u32>>> {
    crate::device::note_read(&ids.device(), ids.dims()[0]);
    let failed = |e: &dyn std::fmt::Debug| {
        ModelError::Device(format!("reading token ids back from the device: {e:?}"))
    };
    let ids = ids
        .try_into_data()
        .map_err(|e| failed(&e))?
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| failed(&e))?;
    Ok(ids
        .into_iter()
        .zip(done)
        .map(|(id, &d)| (!d).then_some(id as u32))
        .collect())
}

/// Runs `input` after `cache` (prefill), then decodes token by token (see [`Steps`]). The first
/// `shared` positions of `cache` are the same in every row (a repeated prefix): the CPU decode path
/// keeps them once.
fn continue_generation(
    model: &Model,
    mut cache: KvCache,
    shared: usize,
    input: &StepInput,
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
) -> Result<Vec<Generation>> {
    let llama = &model.llama;
    let logits = llama.forward_last(input, &mut cache)?;
    if !crate::device::is_cpu(&llama.device) {
        return decode(
            model,
            Logits::Device(Box::new(logits)),
            Steps::Device(cache),
            options,
            on_token,
        );
    }
    let vocab = llama.config.vocab_size;
    let prefill = to_vec(logits)?;
    let logits: Vec<Vec<f32>> = prefill.chunks_exact(vocab).map(<[f32]>::to_vec).collect();
    let state = DecodeState::from_cache_shared(&cache, &llama.config, shared)?;
    drop(cache);
    decode(
        model,
        Logits::Host(logits),
        Steps::Host(state),
        options,
        on_token,
    )
}

/// Draws tokens from `logits` (the distribution of each sequence's next token), then steps the model
/// until every row stops.
fn decode(
    model: &Model,
    mut logits: Logits,
    mut steps: Steps,
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
) -> Result<Vec<Generation>> {
    let b = match &logits {
        Logits::Host(rows) => rows.len(),
        Logits::Device(t) => t.dims()[0],
    };
    let pad = pad_id(model);
    let mut samplers: Vec<Sampler> = (0..b)
        .map(|row| {
            let mut cfg = options.sampling.clone();
            cfg.seed = cfg.seed.wrapping_add(row as u64);
            Sampler::new(&cfg)
        })
        .collect();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
        })
        .collect();
    let mut done = vec![false; b];
    for step in 0..options.max_new_tokens {
        let picked = logits.pick(&mut samplers, &options.sampling, &done)?;
        let mut next = vec![pad; b];
        for (row, id) in picked.into_iter().enumerate() {
            let Some(id) = id else {
                continue;
            };
            if model.tokenizer.eos_ids.contains(&id) {
                done[row] = true;
                out[row].stop = StopReason::Eos;
                continue;
            }
            next[row] = id;
            let g = &mut out[row];
            g.tokens.push(id);
            let text = model.tokenizer.decode(&g.tokens)?;
            // Hold back text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
            let stable = text.trim_end_matches('\u{FFFD}');
            let new_text = stable.get(g.text.len()..).unwrap_or("").to_string();
            g.text = stable.to_string();
            if let Some(cut) = options
                .stop_strings
                .iter()
                .filter_map(|s| g.text.find(s.as_str()))
                .min()
            {
                g.text.truncate(cut);
                g.stop = StopReason::StopString;
                done[row] = true;
            }
            if !on_token(row, id, &new_text) && !done[row] {
                done[row] = true;
                out[row].stop = StopReason::Cancelled;
            }
        }
        // No forward pass after the last token: nothing would read its logits.
        if done.iter().all(|d| *d) || step + 1 == options.max_new_tokens {
            break;
        }
        let active: Vec<bool> = done.iter().map(|d| !d).collect();
        logits = match &mut steps {
            Steps::Host(state) => Logits::Host(model.decode_weights()?.step_with(
                &next,
                &active,
                state,
                model.attached.as_deref(),
            )?),
            Steps::Device(cache) => {
                let input = StepInput {
                    tokens: next.iter().map(|&id| vec![id]).collect(),
                    valid: active.iter().map(|&a| vec![a]).collect(),
                };
                Logits::Device(Box::new(model.llama.forward_last(&input, cache)?))
            }
        };
    }
    for g in &mut out {
        if g.stop != StopReason::StopString {
            g.text = model.tokenizer.decode(&g.tokens)?;
        }
    }
    Ok(out)
}
