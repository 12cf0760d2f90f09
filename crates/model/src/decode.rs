//! The token-by-token decode path: one new token per sequence per step, computed in plain Rust over
//! quantized weights ([`supportlm_quant::kernels`]) so that each step reads the compact GGUF blocks once instead of
//! f32 copies. Prompts are prefilled by [`crate::llama`] (compute-bound batched products: on the CPU its
//! host path, elsewhere tensor ops); its KV cache is then carried over into a [`DecodeState`]. Same
//! math, same layout (Hugging Face RoPE), tested against the Burn forward.

use std::ops::Range;

use rayon::prelude::*;

use crate::cache::KvCache;
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::llama::{rope_tables, to_vec};
use crate::loader::{unpermute_order, TensorSource};
use crate::lora::Adapter;
use crate::names::{self, Target};
use supportlm_quant::kernels::{dot, QMatrix, MAX_BATCH};
use supportlm_quant::pointwise::{exp, swiglu_chunk};
use supportlm_quant::simd_fn;
use supportlm_quant::BaseQuant;

/// One layer's weights in kernel formats.
#[derive(Debug, Clone)]
struct DecodeLayer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v projections: one stacked matrix when they share a format, else three.
    qkv: Vec<QMatrix>,
    o: QMatrix,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o_bias: Option<Vec<f32>>,
    /// gate and up projections, stacked the same way.
    gate_up: Vec<QMatrix>,
    down: QMatrix,
}

/// All weights of the decode path.
#[derive(Debug, Clone)]
pub struct DecodeWeights {
    config: ModelConfig,
    embed: QMatrix,
    lm_head: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<DecodeLayer>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Adds an unmerged adapter's `scale · B (A x)` of `(layer, target)` to each row's output slice
/// `ys[row][from..]` (nothing when the adapter leaves that projection alone). The factors are the
/// adapter's own (`A [r × in]`, `B [out × r]`, Hugging Face row order, as the decode weights).
fn add_lora(
    adapter: &Adapter,
    layer: usize,
    target: Target,
    xs: &[Vec<f32>],
    ys: &mut [Vec<f32>],
    from: usize,
) {
    let Some(pair) = adapter.weights.get(&(layer, target)) else {
        return;
    };
    let (r, scale) = (adapter.config.r, adapter.config.scale() as f32);
    for (x, y) in xs.iter().zip(ys.iter_mut()) {
        let t: Vec<f32> = pair
            .a
            .chunks_exact(x.len())
            .map(|row| dot(row, x) * scale)
            .collect();
        for (out, brow) in y[from..].iter_mut().zip(pair.b.chunks_exact(r)) {
            *out += dot(brow, &t);
        }
    }
}

/// Keys or values by sequence and layer, each `[position][kv_heads × head_dim]`.
type PerSequence = Vec<Vec<Vec<f32>>>;

/// KV cache of the decode path. Every row first sees the `shared` positions (a prompt prefix common
/// to the batch, kept once: each step reads them once for all rows), then its own: `k[row][layer]` is
/// `[position][kv_heads × head_dim]` for the row's positions after the shared ones.
#[derive(Debug, Clone)]
pub struct DecodeState {
    shared: Shared,
    k: PerSequence,
    v: PerSequence,
    /// Per row, whether each of its own positions is a real token (padding is masked out).
    valid: Vec<Vec<bool>>,
    next_pos: Vec<usize>,
}

/// Keys and values per layer (`[position][kv_heads × head_dim]`) of the positions every row sees first.
#[derive(Debug, Clone, Default)]
struct Shared {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl DecodeState {
    /// Takes over a cache filled by the model's prefill ([`crate::llama::Llama::forward_hidden`]).
    pub fn from_cache(cache: &KvCache, config: &ModelConfig) -> Result<Self> {
        Self::from_cache_shared(cache, config, 0)
    }

    /// [`DecodeState::from_cache`] for a cache whose first `shared` positions hold the same keys and
    /// values in every row, all valid (a prefix repeated for a batch, as `KvCache::repeat` makes):
    /// they are kept once. The caller vouches for the sameness; the validity is checked.
    pub fn from_cache_shared(cache: &KvCache, config: &ModelConfig, shared: usize) -> Result<Self> {
        let t = cache.len();
        if shared > t || cache.valid.iter().any(|v| v[..shared].contains(&false)) {
            return Err(ModelError::Input(format!(
                "{shared} shared positions of a {t}-position cache must be valid in every row"
            )));
        }
        let picks: Vec<(usize, Vec<usize>)> = (0..cache.batch())
            .map(|r| (r, (shared..t).collect()))
            .collect();
        Self::gather(
            cache,
            config,
            (0..shared).collect(),
            picks,
            cache.valid.iter().map(|v| v[shared..].to_vec()).collect(),
            cache.next_pos.clone(),
        )
    }

    /// Several sequences from one batch-1 cache: sequence `r` gets the cached positions `positions[r]`,
    /// in that order (e.g. a shared prefix and that sequence's own tokens of a tree-masked pass), and
    /// continues at RoPE position `next_pos[r]`. The leading positions all sequences have in common
    /// are kept once.
    pub fn from_positions(
        cache: &KvCache,
        config: &ModelConfig,
        positions: &[Vec<usize>],
        next_pos: Vec<usize>,
    ) -> Result<Self> {
        if cache.batch() != 1 || positions.len() != next_pos.len() {
            return Err(ModelError::Input(
                "picking sequences needs a batch-1 cache and one next position per sequence".into(),
            ));
        }
        let common = positions.first().map_or(0, |first| {
            (0..first.len())
                .take_while(|&i| positions.iter().all(|p| p.get(i) == Some(&first[i])))
                .count()
        });
        let shared = positions
            .first()
            .map_or(Vec::new(), |p| p[..common].to_vec());
        let picks: Vec<(usize, Vec<usize>)> = positions
            .iter()
            .map(|p| (0, p[common..].to_vec()))
            .collect();
        let valid = positions
            .iter()
            .map(|p| vec![true; p.len() - common])
            .collect();
        Self::gather(cache, config, shared, picks, valid, next_pos)
    }

    /// The state whose rows see `shared` (positions of `cache`'s row 0) and then their own `picks`
    /// (batch row, positions), gathered in one read of each layer's cache.
    fn gather(
        cache: &KvCache,
        config: &ModelConfig,
        shared: Vec<usize>,
        mut picks: Vec<(usize, Vec<usize>)>,
        valid: Vec<Vec<bool>>,
        next_pos: Vec<usize>,
    ) -> Result<Self> {
        let len = shared.len();
        picks.push((0, shared));
        let (mut k, mut v) = gather_layers(cache, config, &picks)?;
        let shared = Shared {
            k: k.pop().unwrap_or_default(),
            v: v.pop().unwrap_or_default(),
            len,
        };
        Ok(DecodeState {
            shared,
            k,
            v,
            valid,
            next_pos,
        })
    }

    /// Rows (sequences) being decoded.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }
}

/// Per picked sequence and layer, the keys and values of its cached positions: `picks[i]` is (batch row
/// of `cache`, positions in that row, in order).
fn gather_layers(
    cache: &KvCache,
    config: &ModelConfig,
    picks: &[(usize, Vec<usize>)],
) -> Result<(PerSequence, PerSequence)> {
    let (kvh, d) = (config.kv_heads(), config.head_dim());
    let mut k = vec![Vec::with_capacity(cache.layers.len()); picks.len()];
    let mut v = vec![Vec::with_capacity(cache.layers.len()); picks.len()];
    for layer in &cache.layers {
        for (dst, src) in [(&mut k, &layer.k), (&mut v, &layer.v)] {
            let src = src
                .clone()
                .ok_or_else(|| ModelError::Input("cache has not been filled".into()))?;
            let t = src.dims()[2];
            if picks.iter().flat_map(|(_, p)| p).any(|&p| p >= t) {
                return Err(ModelError::Input(format!(
                    "a picked position is outside the cache's {t}"
                )));
            }
            let values = to_vec(src)?; // [b, kvh, t, d]
            for (dst_row, (row, positions)) in dst.iter_mut().zip(picks) {
                dst_row.push(gather(
                    &values,
                    [*row, kvh, t, d],
                    positions.iter().copied(),
                ));
            }
        }
    }
    Ok((k, v))
}

/// `positions` of batch row `row` of a `[b, kv_heads, t, head_dim]` cache tensor, as
/// `[position][kv_heads × head_dim]` (with room for a few more positions: decoding appends).
fn gather(
    values: &[f32],
    [row, kvh, t, d]: [usize; 4],
    positions: impl ExactSizeIterator<Item = usize>,
) -> Vec<f32> {
    let mut flat = Vec::with_capacity((positions.len() + 64) * kvh * d);
    for pos in positions {
        for h in 0..kvh {
            let at = ((row * kvh + h) * t + pos) * d;
            flat.extend_from_slice(&values[at..at + d]);
        }
    }
    flat
}

fn matrix(
    src: &dyn TensorSource,
    name: &str,
    rows: usize,
    cols: usize,
    heads: Option<usize>,
) -> Result<QMatrix> {
    let m = match src.raw(name)? {
        Some(raw) => {
            check_shape(name, &raw.shape, &[rows, cols])?;
            QMatrix::from_ggml(raw.ty, &raw.bytes, rows, cols)
        }
        None => {
            let (values, shape) = src.tensor(name)?.ok_or_else(|| ModelError::MissingTensor {
                tensor: name.into(),
            })?;
            check_shape(name, &shape, &[rows, cols])?;
            return Ok(QMatrix::from_f32(&values, rows, cols));
        }
    };
    // Raw GGUF rows of llama Q/K are in llama.cpp's order: reorder to the Hugging Face layout.
    Ok(match heads {
        Some(h) => m.reorder_rows(&unpermute_order(rows, h)),
        None => m,
    })
}

fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let (values, shape) = src.tensor(name)?.ok_or_else(|| ModelError::MissingTensor {
        tensor: name.into(),
    })?;
    check_shape(name, &shape, &[len])?;
    Ok(values)
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(ModelError::ShapeMismatch {
            tensor: name.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// Head layout of one attention step: `kvh` key/value heads of width `d`, `rep` query heads each.
#[derive(Debug, Clone, Copy)]
struct HeadShape {
    kvh: usize,
    rep: usize,
    d: usize,
}

/// One row's cached keys and values (`[position][kvh × d]`) after the shared positions, and which of
/// those positions are real.
struct OwnKv<'a> {
    k: &'a [f32],
    v: &'a [f32],
    valid: &'a [bool],
}

simd_fn! {
    /// Attention outputs (`[heads × d]` each) of several rows, for queries `qs[i]` over the shared
    /// positions and then row `i`'s own (positions not valid are skipped). A row gets exactly what it
    /// would with the shared keys and values copied into its own cache (the same operations in the
    /// same order: scores, softmax, then the weighted values in position order), but each shared key
    /// and value is read once for all the rows. The query heads sharing a key/value head are scored in
    /// one pass. Only the key/value heads `groups` (and their query heads) are computed: the outputs
    /// are `[groups.len() × rep × d]` each.
    ///
    /// Compiled for AVX2 + FMA too (the dot products and the weighted sums in 8 lanes), with the
    /// vectorizable `exp` of `supportlm_quant::pointwise`.
    fn attend(
        qs: &[&[f32]],
        shared: &Shared,
        li: usize,
        own: &[OwnKv<'_>],
        shape: HeadShape,
        groups: Range<usize>,
    ) -> Vec<Vec<f32>> {
        let HeadShape { kvh, rep, d } = shape;
        let scale = 1.0 / (d as f32).sqrt();
        let (sk, sv) = match (shared.k.get(li), shared.v.get(li)) {
            (Some(k), Some(v)) if shared.len > 0 => (k.as_slice(), v.as_slice()),
            _ => (&[][..], &[][..]),
        };
        let at = |pos: usize, g: usize| (pos * kvh + g) * d..(pos * kvh + g + 1) * d;
        let lens: Vec<usize> = own.iter().map(|o| shared.len + o.valid.len()).collect();
        let mut out = vec![vec![0f32; groups.len() * rep * d]; qs.len()];
        let mut scores: Vec<Vec<f32>> = lens
            .iter()
            .map(|&t| vec![f32::NEG_INFINITY; rep * t])
            .collect();
        // Per row and query head of the group: the softmax's sum (`None`: nothing to attend to).
        let mut totals = vec![vec![None::<f32>; rep]; qs.len()];
        for g in groups.clone() {
            // This group's query heads in the output.
            let o_at = |r: usize| {
                let head = (g - groups.start) * rep + r;
                head * d..(head + 1) * d
            };
            let heads = |i: usize| qs[i][g * rep * d..(g + 1) * rep * d].chunks_exact(d);
            // Shared positions in blocks whose keys stay in L1 while every row's heads are scored.
            for start in (0..shared.len).step_by(SHARED_BLOCK) {
                let end = (start + SHARED_BLOCK).min(shared.len);
                for (i, row_scores) in scores.iter_mut().enumerate() {
                    for (r, qh) in heads(i).enumerate() {
                        let head_scores = &mut row_scores[r * lens[i]..][start..end];
                        for (pos, s) in (start..end).zip(head_scores) {
                            *s = dot(qh, &sk[at(pos, g)]) * scale;
                        }
                    }
                }
            }
            for (i, (o, row_scores)) in own.iter().zip(&mut scores).enumerate() {
                for (p, _) in o.valid.iter().enumerate().filter(|(_, v)| **v) {
                    let key = &o.k[at(p, g)];
                    for (r, qh) in heads(i).enumerate() {
                        row_scores[r * lens[i] + shared.len + p] = dot(qh, key) * scale;
                    }
                }
            }
            for (i, row_scores) in scores.iter_mut().enumerate() {
                for (r, head_scores) in row_scores.chunks_exact_mut(lens[i]).enumerate() {
                    let max = head_scores
                        .iter()
                        .copied()
                        .fold(f32::NEG_INFINITY, f32::max);
                    totals[i][r] = (max != f32::NEG_INFINITY).then(|| {
                        let mut total = 0f32;
                        for s in head_scores.iter_mut() {
                            *s = exp(*s - max);
                            total += *s;
                        }
                        total
                    });
                }
            }
            // The weighted values, shared positions first, in blocks whose values stay in L1 while every
            // row's heads add them up.
            for start in (0..shared.len).step_by(SHARED_BLOCK) {
                let end = (start + SHARED_BLOCK).min(shared.len);
                for (i, row_scores) in scores.iter_mut().enumerate() {
                    for (r, head_scores) in row_scores.chunks_exact_mut(lens[i]).enumerate() {
                        let o = &mut out[i][o_at(r)];
                        add_values(o, &mut head_scores[start..end], totals[i][r], |k| {
                            &sv[at(start + k, g)]
                        });
                    }
                }
            }
            for (i, (own, row_scores)) in own.iter().zip(&mut scores).enumerate() {
                for (r, head_scores) in row_scores.chunks_exact_mut(lens[i]).enumerate() {
                    let o = &mut out[i][o_at(r)];
                    add_values(o, &mut head_scores[shared.len..], totals[i][r], |k| {
                        &own.v[at(k, g)]
                    });
                }
            }
        }
        out
    }
}

/// Shared positions scored, then added up, per block in [`attend`]: 64 keys or values of one head
/// (16 KiB at width 64) stay in L1 while every row of a thread uses them.
const SHARED_BLOCK: usize = 64;

/// `o += (p / total) · value(k)` over one head's softmax numerators `probs` in order (zero weights
/// skipped; nothing added when the head has nothing to attend to, `total` `None`), each then reset to
/// `-inf` for the next key/value head.
#[inline(always)]
fn add_values<'a>(
    o: &mut [f32],
    probs: &mut [f32],
    total: Option<f32>,
    value: impl Fn(usize) -> &'a [f32],
) {
    for (k, p) in probs.iter_mut().enumerate() {
        if let Some(total) = total {
            if *p != 0.0 {
                let w = *p / total;
                o.iter_mut().zip(value(k)).for_each(|(o, v)| *o += w * v);
            }
        }
        *p = f32::NEG_INFINITY;
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps as f32).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// `y = W x` for each row's vector (up to [`MAX_BATCH`] at a time).
fn matvec(m: &QMatrix, xs: &[Vec<f32>], bias: Option<&Vec<f32>>) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = vec![vec![0f32; m.rows]; xs.len()];
    for start in (0..xs.len()).step_by(MAX_BATCH) {
        let group: Vec<&[f32]> = xs[start..(start + MAX_BATCH).min(xs.len())]
            .iter()
            .map(Vec::as_slice)
            .collect();
        let mut ys = vec![0f32; m.rows * group.len()];
        m.matvecs(&group, &mut ys);
        for (r, chunk) in ys.chunks_exact(group.len()).enumerate() {
            for (b, y) in chunk.iter().enumerate() {
                out[start + b][r] = *y;
            }
        }
    }
    if let Some(bias) = bias {
        for y in &mut out {
            y.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
    }
    out
}

/// Products with several matrices (or one stacked matrix), each row's outputs concatenated in order.
fn stacked_matvec(parts: &[QMatrix], xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); xs.len()];
    for m in parts {
        for (row, y) in matvec(m, xs, None).into_iter().enumerate() {
            out[row].extend(y);
        }
    }
    out
}

impl DecodeWeights {
    /// Reads the decode weights (quantized where the source has them) by Hugging Face name.
    pub fn load(src: &dyn TensorSource, config: &ModelConfig) -> Result<Self> {
        Self::load_as(src, config, BaseQuant::None)
    }

    /// [`DecodeWeights::load`] with the layers' linear weights re-quantized in `quant`'s format
    /// (`none`: as stored), from the values the Burn model holds: the same codes
    /// [`crate::llama::Llama::quantize_linears`] and QLoRA training make.
    pub fn load_as(src: &dyn TensorSource, config: &ModelConfig, quant: BaseQuant) -> Result<Self> {
        let c = config;
        let (hidden, d) = (c.hidden_size, c.head_dim());
        let permuted = src.raw_is_permuted() && c.model_type == Architecture::Llama;
        // Raw GGUF rows (and biases) of llama Q/K are in llama.cpp's order.
        let heads = |t: Target| match t {
            Target::QProj if permuted => Some(c.num_attention_heads),
            Target::KProj if permuted => Some(c.kv_heads()),
            _ => None,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let ln = names::layer(i);
            let m = |t: Target| {
                let [rows, cols] = t.shape(c);
                let stored = matrix(src, &ln.proj(t).weight(), rows, cols, heads(t))?;
                Ok::<_, ModelError>(match quant {
                    BaseQuant::None => stored,
                    _ => QMatrix::quantize(&stored.dequantize(), rows, cols, quant),
                })
            };
            let bias = |t: Target| -> Result<Option<Vec<f32>>> {
                if !t.has_bias(c) {
                    return Ok(None);
                }
                let len = t.shape(c)[0];
                let v = vector(src, &ln.proj(t).bias(), len)?;
                Ok(Some(match heads(t) {
                    Some(h) => unpermute_order(len, h).iter().map(|&i| v[i]).collect(),
                    None => v,
                }))
            };
            let q = m(Target::QProj)?;
            let k = m(Target::KProj)?;
            let v = m(Target::VProj)?;
            let gate = m(Target::GateProj)?;
            let up = m(Target::UpProj)?;
            layers.push(DecodeLayer {
                attn_norm: vector(src, &ln.input_norm(), hidden)?,
                ffn_norm: vector(src, &ln.post_attention_norm(), hidden)?,
                qkv: QMatrix::stack(&[&q, &k, &v]).map_or_else(|| vec![q, k, v], |m| vec![m]),
                o: m(Target::OProj)?,
                q_bias: bias(Target::QProj)?,
                k_bias: bias(Target::KProj)?,
                v_bias: bias(Target::VProj)?,
                o_bias: bias(Target::OProj)?,
                gate_up: QMatrix::stack(&[&gate, &up]).map_or_else(|| vec![gate, up], |m| vec![m]),
                down: m(Target::DownProj)?,
            });
        }
        let embed = matrix(src, names::EMBED_TOKENS, c.vocab_size, hidden, None)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(matrix(src, names::LM_HEAD, c.vocab_size, hidden, None)?)
        };
        let (cos, sin) = rope_tables(d, c.rope_theta, c.max_position_embeddings);
        Ok(DecodeWeights {
            config: config.clone(),
            embed,
            lm_head,
            norm: vector(src, names::FINAL_NORM, hidden)?,
            layers,
            cos,
            sin,
        })
    }

    /// Bytes of weights read per decode step (every matrix once, plus one embedding row per sequence).
    pub fn bytes_per_step(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv
                    .iter()
                    .chain(&l.gate_up)
                    .chain([&l.o, &l.down])
                    .map(QMatrix::size_bytes)
                    .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.as_ref().unwrap_or(&self.embed).size_bytes()
    }

    /// Runs one token per sequence (`active[row] == false` feeds padding that is masked out) and returns
    /// each row's next-token logits.
    pub fn step(
        &self,
        tokens: &[u32],
        active: &[bool],
        state: &mut DecodeState,
    ) -> Result<Vec<Vec<f32>>> {
        self.step_with(tokens, active, state, None)
    }

    /// [`DecodeWeights::step`] with an unmerged adapter (one already validated against this model, as
    /// [`crate::lora::attach`] does) added to every projection it adapts.
    pub fn step_with(
        &self,
        tokens: &[u32],
        active: &[bool],
        state: &mut DecodeState,
        lora: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        // On a worker of rayon's pool, as the training step: the token's ~120 parallel kernel calls
        // then split their rows there, where the caller's thread would hand each one over and sleep
        // until it is done (two context switches per call).
        rayon::scope(|_| self.step_on_worker(tokens, active, state, lora))
    }

    fn step_on_worker(
        &self,
        tokens: &[u32],
        active: &[bool],
        state: &mut DecodeState,
        lora: Option<&Adapter>,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let b = tokens.len();
        if b != state.batch() || active.len() != b {
            return Err(ModelError::Input(format!(
                "{b} tokens for a decode state of {} rows",
                state.batch()
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let (h, kvh, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let half = d / 2;
        let rep = h / kvh;
        let max_pos = c.max_position_embeddings;
        let positions: Vec<usize> = state.next_pos.iter().map(|&p| p.min(max_pos - 1)).collect();
        if let Some(p) = state
            .next_pos
            .iter()
            .zip(active)
            .find(|(p, a)| **a && **p >= max_pos)
        {
            return Err(ModelError::Input(format!(
                "position {} exceeds the context of {max_pos}",
                p.0
            )));
        }
        for ((valid, pos), &on) in state.valid.iter_mut().zip(&mut state.next_pos).zip(active) {
            valid.push(on);
            if on {
                *pos += 1;
            }
        }
        let rope = |x: &mut [f32], pos: usize| {
            let (cos, sin) = (
                &self.cos[pos * d..(pos + 1) * d],
                &self.sin[pos * d..(pos + 1) * d],
            );
            for head in x.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, bb) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - bb * sin[i];
                    head[i + half] = bb * cos[i + half] + a * sin[i + half];
                }
            }
        };
        let mut x: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| {
                let mut row = vec![0f32; c.hidden_size];
                self.embed.row_f32(t as usize, &mut row);
                row
            })
            .collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let n: Vec<Vec<f32>> = x
                .iter()
                .map(|r| rms_norm(r, &layer.attn_norm, c.rms_norm_eps))
                .collect();
            let mut qkv = stacked_matvec(&layer.qkv, &n);
            let (q_out, kv_out) = (h * d, kvh * d);
            if let Some(l) = lora {
                add_lora(l, li, Target::QProj, &n, &mut qkv, 0);
                add_lora(l, li, Target::KProj, &n, &mut qkv, q_out);
                add_lora(l, li, Target::VProj, &n, &mut qkv, q_out + kv_out);
            }
            let split = |from: usize, len: usize, bias: Option<&Vec<f32>>| -> Vec<Vec<f32>> {
                qkv.iter()
                    .map(|r| {
                        let mut part = r[from..from + len].to_vec();
                        if let Some(bias) = bias {
                            part.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                        }
                        part
                    })
                    .collect()
            };
            let mut q = split(0, q_out, layer.q_bias.as_ref());
            let mut k = split(q_out, kv_out, layer.k_bias.as_ref());
            let v = split(q_out + kv_out, kv_out, layer.v_bias.as_ref());
            for row in 0..b {
                rope(&mut q[row], positions[row]);
                rope(&mut k[row], positions[row]);
                state.k[row][li].extend_from_slice(&k[row]);
                state.v[row][li].extend_from_slice(&v[row]);
            }
            // Rows are independent: attend in parallel, one group of rows per thread, so that each
            // thread reads the shared keys and values once for its rows. With fewer rows than
            // threads the key/value heads are split between threads too (each head's outputs are
            // computed alike either way).
            let shape = HeadShape { kvh, rep, d };
            let threads = rayon::current_num_threads().max(1);
            let per_thread = b.div_ceil(threads).max(1);
            let per_split = kvh.div_ceil((threads / b.max(1)).clamp(1, kvh));
            let rows: Vec<usize> = (0..b).collect();
            let tasks: Vec<(&[usize], Range<usize>)> = rows
                .chunks(per_thread)
                .flat_map(|rows| {
                    (0..kvh)
                        .step_by(per_split)
                        .map(move |g| (rows, g..(g + per_split).min(kvh)))
                })
                .collect();
            let parts: Vec<Vec<Vec<f32>>> = tasks
                .par_iter()
                .map(|(group, heads)| {
                    let qs: Vec<&[f32]> = group.iter().map(|&row| q[row].as_slice()).collect();
                    let own: Vec<OwnKv<'_>> = group
                        .iter()
                        .map(|&row| OwnKv {
                            k: &state.k[row][li],
                            v: &state.v[row][li],
                            valid: &state.valid[row],
                        })
                        .collect();
                    attend(&qs, &state.shared, li, &own, shape, heads.clone())
                })
                .collect();
            let mut attn_out: Vec<Vec<f32>> = vec![Vec::with_capacity(h * d); b];
            for ((group, _), part) in tasks.iter().zip(parts) {
                for (&row, out) in group.iter().zip(part) {
                    attn_out[row].extend(out);
                }
            }
            let mut o = matvec(&layer.o, &attn_out, layer.o_bias.as_ref());
            if let Some(l) = lora {
                add_lora(l, li, Target::OProj, &attn_out, &mut o, 0);
            }
            for (xr, or) in x.iter_mut().zip(&o) {
                xr.iter_mut().zip(or).for_each(|(a, b)| *a += b);
            }
            let n: Vec<Vec<f32>> = x
                .iter()
                .map(|r| rms_norm(r, &layer.ffn_norm, c.rms_norm_eps))
                .collect();
            let mut gate_up = stacked_matvec(&layer.gate_up, &n);
            if let Some(l) = lora {
                add_lora(l, li, Target::GateProj, &n, &mut gate_up, 0);
                add_lora(l, li, Target::UpProj, &n, &mut gate_up, c.intermediate_size);
            }
            let act: Vec<Vec<f32>> = gate_up
                .iter()
                .map(|r| {
                    let (g, u) = r.split_at(c.intermediate_size);
                    let mut act = vec![0f32; g.len()];
                    swiglu_chunk(&mut act, g, u);
                    act
                })
                .collect();
            let mut down = matvec(&layer.down, &act, None);
            if let Some(l) = lora {
                add_lora(l, li, Target::DownProj, &act, &mut down, 0);
            }
            for (xr, dr) in x.iter_mut().zip(&down) {
                xr.iter_mut().zip(dr).for_each(|(a, b)| *a += b);
            }
        }
        let n: Vec<Vec<f32>> = x
            .iter()
            .map(|r| rms_norm(r, &self.norm, c.rms_norm_eps))
            .collect();
        Ok(matvec(
            self.lm_head.as_ref().unwrap_or(&self.embed),
            &n,
            None,
        ))
    }
}
