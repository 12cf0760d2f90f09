//! The llama / qwen2 decoder (one file for both: qwen2 is llama with q/k/v biases).
//!
//! Pre-norm blocks: `h = x + o_proj(attn(rmsnorm(x)))`, `out = h + down(silu(gate(n)) * up(n))` with
//! `n = rmsnorm(h)`; grouped-query attention; RoPE in the Hugging Face layout (`rotate_half`, pairs
//! `(i, i + d/2)`); an explicit [`KvCache`] passed to every forward. Weights are kept as
//! `[out, in]` (the checkpoint layout) and multiplied through a transposed view.

mod host;

use std::sync::Arc;

use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cache::{KvCache, LayerCache};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::names::Target;
use crate::weight::BaseWeight;
use supportlm_quant::BaseQuant;

/// Copies a tensor's values to the host (counted by [`crate::device::note_read`]).
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    let device = t.device();
    crate::device::note_read(&device, t.shape().num_elements());
    t.try_into_vec_as::<f32>().map_err(|e| {
        if crate::device::is_cpu(&device) {
            ModelError::Internal(format!("reading a tensor back from the backend: {e:?}"))
        } else {
            // GPU runtimes report failed allocations and kernels when results are read.
            ModelError::Device(format!(
                "the device failed a computation (out of memory, or a buffer larger than it \
                 allows?): {e:?}"
            ))
        }
    })
}

/// A low-rank update added to a linear layer's output without merging it into `W` (LoRA, attached).
/// Inference uses [`LoraDelta`]; training plugs in its own (dropout on the update's input).
pub trait LowRank: std::fmt::Debug + Send + Sync {
    /// The update for input rows `x`.
    ///
    /// # Shapes
    /// - `x`: `[n, in]` → `[n, out]`
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;
}

/// A LoRA update `s · B(A x)`.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `[r, in]`.
    pub a: Tensor<2>,
    /// `[out, r]`.
    pub b: Tensor<2>,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

impl LoraDelta {
    /// `s · B(A x)` computed as `((x Aᵀ) · s) Bᵀ`: the rank-r product is scaled, not the output.
    pub fn apply(x: Tensor<2>, a: &Tensor<2>, b: &Tensor<2>, scale: f64) -> Tensor<2> {
        let low = x.matmul(a.clone().transpose()) * scale;
        low.matmul(b.clone().transpose())
    }
}

impl LowRank for LoraDelta {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        LoraDelta::apply(x, &self.a, &self.b, self.scale)
    }
}

/// A dense linear layer `y = x Wᵀ + b (+ LoRA)` with `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: BaseWeight,
    /// `[out]`.
    pub bias: Option<Tensor<1>>,
    /// An attached, unmerged low-rank update.
    pub lora: Option<Arc<dyn LowRank>>,
}

impl Linear {
    /// A linear layer without an adapter.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Linear {
            weight: BaseWeight::F32(weight),
            bias,
            lora: None,
        }
    }

    /// # Shapes
    /// - `x`: `[b, s, in]` → `[b, s, out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let [out, _] = self.weight.dims();
        let x = x.reshape([b * s, i]);
        let mut y = x
            .clone()
            .matmul(self.weight.tensor(&x.device()).transpose());
        if let Some(bias) = &self.bias {
            y = y + bias.clone().unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            y = y + lora.forward(x);
        }
        y.reshape([b, s, out])
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[hidden]`.
    pub weight: Tensor<1>,
    /// Added to the mean square before the root.
    pub eps: f64,
}

impl RmsNorm {
    /// `x / sqrt(mean(x²) + eps) * w` over the last axis.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let inv = (x.clone().square().mean_dim(2) + self.eps).sqrt().recip();
        x * inv * self.weight.clone().unsqueeze_dims::<3>(&[0, 1])
    }
}

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
}

/// The SwiGLU feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`; shapes `[b, s, hidden]` → `[b, s, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The SwiGLU block.
    pub mlp: Mlp,
}

/// cos and sin of every RoPE angle, `[max_positions][head_dim]` (each frequency twice: Hugging Face
/// layout). As transformers computes them: `inv_freq` in f32, angle = f32(position) · inv_freq in f32.
pub fn rope_tables(head_dim: usize, theta: f64, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    let mut cos = Vec::with_capacity(max_positions * head_dim);
    let mut sin = Vec::with_capacity(max_positions * head_dim);
    for p in 0..max_positions {
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// Rotary embedding tables, `[max_positions, head_dim]`, Hugging Face layout (frequencies repeated twice).
#[derive(Debug, Clone)]
pub struct Rope {
    pub(crate) cos: Tensor<2>,
    pub(crate) sin: Tensor<2>,
    /// Positions the tables cover (the context length).
    pub max_positions: usize,
}

impl Rope {
    /// Tables for `max_positions` positions of `head_dim`-wide heads with base `theta`.
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Self {
        let (cos, sin) = rope_tables(head_dim, theta, max_positions);
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v, [max_positions, head_dim]), device)
        };
        Rope {
            cos: table(cos),
            sin: table(sin),
            max_positions,
        }
    }

    /// The tables of `c`'s heads over its whole context.
    pub fn for_config(c: &ModelConfig, device: &Device) -> Self {
        Rope::new(
            c.head_dim(),
            c.rope_theta,
            c.max_position_embeddings,
            device,
        )
    }

    /// Rotates `x` (`[b, heads, s, d]`) by the angles of `positions` (`[b, s]`).
    pub fn apply(&self, x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [_, _, _, d] = x.dims();
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// cos and sin for given positions, shaped `[b, 1, s, d]` to broadcast over heads.
    pub fn tables(&self, positions: &[Vec<usize>], device: &Device) -> (Tensor<4>, Tensor<4>) {
        let b = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let flat: Vec<i64> = positions.iter().flatten().map(|&p| p as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * s]), device);
        let d = self.cos.dims()[1];
        let pick = |t: &Tensor<2>| t.clone().select(0, idx.clone()).reshape([b, 1, s, d]);
        (pick(&self.cos), pick(&self.sin))
    }
}

impl DecoderLayer {
    /// Runs one layer on `x` (`[b, s, hidden]`), appending this step's keys and values to `cache`.
    /// `cos`/`sin` come from [`Rope::tables`] for the step's positions; `mask` is `[b, 1, s, cached + s]`,
    /// `0` where a query sees a key and `-1e30` where it does not (a query that sees nothing gets zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        c: &ModelConfig,
        rope: &Rope,
        x: Tensor<3>,
        cache: &mut LayerCache,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4>,
    ) -> Tensor<3> {
        let layer = self;
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let n = layer.input_layernorm.forward(x.clone());
        let attn = &layer.self_attn;
        let q = attn
            .q_proj
            .forward(n.clone())
            .reshape([b, s, h, d])
            .swap_dims(1, 2);
        let k = attn
            .k_proj
            .forward(n.clone())
            .reshape([b, s, kvh, d])
            .swap_dims(1, 2);
        let v = attn
            .v_proj
            .forward(n)
            .reshape([b, s, kvh, d])
            .swap_dims(1, 2);
        let q = rope.apply(q, cos, sin);
        let k = rope.apply(k, cos, sin);
        let (k, v) = cache.append(k, v);
        let rep = h / kvh;
        // Query head q uses KV head q / rep: group the query heads of each KV head on one axis, so the
        // keys and values are never repeated; the mask repeats along that axis instead.
        let q = q.reshape([b, kvh, rep * s, d]);
        let hidden_positions = mask.clone().lower_elem(MASK_BELOW).repeat_dim(2, rep);
        // Burn's fused attention: burn-flex runs it per head with the masked scores at -inf (no
        // materialized `[b, h, s, t]` softmax passes); autodiff differentiates its decomposition.
        let out = attention(q, k, v, Some(hidden_positions), None, Default::default())
            .reshape([b, h, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, h * d]);
        let x = x + attn.o_proj.forward(out);
        let n = layer.post_attention_layernorm.forward(x.clone());
        x + layer.mlp.forward(n)
    }
}

/// Mask entries below this are hidden positions (the masks hold `0` for visible and `-1e30` for hidden).
pub(crate) const MASK_BELOW: f32 = -1e29;

/// The whole decoder: embeddings, layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The checkpoint's configuration.
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor<2>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// The final RMSNorm.
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor<2>>,
    /// RoPE tables.
    pub rope: Rope,
    /// The device every tensor lives on.
    pub device: Device,
    /// What runs passes of several tokens (prefill, scoring) on the CPU backend.
    pub prompt_path: PromptPath,
}

/// Which implementation runs [`Llama`]'s passes on the CPU backend (other devices always run tensor
/// ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptPath {
    /// Host buffers: matrix products plus fused row loops (`llama/host.rs`).
    #[default]
    Host,
    /// Burn tensor ops, as on every other device: the reference the host path is tested against.
    Tensors,
}

/// One step's input: `tokens[row]` (all rows the same length) and which of them are real (not padding).
#[derive(Debug, Clone)]
pub struct StepInput {
    /// Token ids per row.
    pub tokens: Vec<Vec<u32>>,
    /// Whether each token is real (`false`: padding, masked out).
    pub valid: Vec<Vec<bool>>,
}

impl StepInput {
    /// Unpadded rows of equal length.
    pub fn dense(tokens: Vec<Vec<u32>>) -> Self {
        let valid = tokens.iter().map(|t| vec![true; t.len()]).collect();
        StepInput { tokens, valid }
    }
}

impl Llama {
    /// Stores every f32 linear weight of the layers in `quant`'s format (the same values QLoRA
    /// training quantizes: Hugging Face layout, one matrix at a time); embeddings, norms and the LM head
    /// stay f32. Layers then dequantize their weights when they run.
    pub fn quantize_linears(&mut self, quant: BaseQuant) -> Result<()> {
        if quant == BaseQuant::None {
            return Ok(());
        }
        let device = self.device.clone();
        for layer in &mut self.layers {
            for target in Target::ALL {
                let linear = layer.linear_mut(target);
                if let BaseWeight::F32(t) = &linear.weight {
                    let [rows, cols] = t.dims();
                    let values = to_vec(t.clone())?;
                    linear.weight = BaseWeight::new(values, rows, cols, quant, &device);
                }
            }
        }
        Ok(())
    }

    /// An empty KV cache for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.layers.len(), batch)
    }

    /// Runs new tokens through the model, extending `cache`, and returns the final hidden states
    /// (after the last norm), `[b, s, hidden]`. With `collect` the residual stream after the embedding
    /// and after every layer is pushed there (for parity tests).
    pub fn forward_hidden(
        &self,
        input: &StepInput,
        cache: &mut KvCache,
        collect: Option<&mut Vec<Tensor<3>>>,
    ) -> Result<Tensor<3>> {
        let b = input.tokens.len();
        let s = input.tokens.first().map_or(0, Vec::len);
        if b != cache.batch() || input.tokens.iter().any(|t| t.len() != s) || input.valid.len() != b
        {
            return Err(ModelError::Input(format!(
                "step input has {b} rows of unequal length or does not match the cache's batch of {}",
                cache.batch()
            )));
        }
        if s == 0 {
            return Err(ModelError::Input("empty step input".into()));
        }
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = input.tokens.iter().flatten().find(|&&t| t >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }

        // Positions and the attention mask, from the cache's bookkeeping.
        let past = cache.len();
        let total = past + s;
        let mut positions = Vec::with_capacity(b);
        let mut mask = vec![0f32; b * s * total];
        for row in 0..b {
            let mut pos = cache.next_pos[row];
            let mut row_pos = Vec::with_capacity(s);
            for i in 0..s {
                row_pos.push(pos.min(self.rope.max_positions - 1));
                if input.valid[row][i] {
                    pos += 1;
                }
            }
            if pos > self.rope.max_positions {
                return Err(ModelError::Input(format!(
                    "sequence of {pos} positions exceeds the model's context of {}",
                    self.rope.max_positions
                )));
            }
            cache.next_pos[row] = pos;
            cache.valid[row].extend_from_slice(&input.valid[row]);
            positions.push(row_pos);
            for i in 0..s {
                for j in 0..total {
                    let visible = j <= past + i && cache.valid[row][j];
                    if !visible {
                        mask[(row * s + i) * total + j] = -1e30;
                    }
                }
            }
        }
        let flat: Vec<u32> = input.tokens.iter().flatten().copied().collect();
        self.run(&flat, b, s, &positions, mask, cache, collect)
    }

    /// Runs `b × s` tokens with explicit RoPE positions and an additive mask `[b, 1, s, cached + s]`
    /// (0 visible, -1e30 hidden), appending their keys and values to `cache`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        tokens: &[u32],
        b: usize,
        s: usize,
        positions: &[Vec<usize>],
        mask: Vec<f32>,
        cache: &mut KvCache,
        collect: Option<&mut Vec<Tensor<3>>>,
    ) -> Result<Tensor<3>> {
        // On a worker of rayon's pool, where the backend's parallel ops split their work without
        // handing each one over from the caller's thread (see `decode::DecodeWeights::step_with`).
        rayon::scope(|_| self.run_on_worker(tokens, b, s, positions, mask, cache, collect))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_on_worker(
        &self,
        tokens: &[u32],
        b: usize,
        s: usize,
        positions: &[Vec<usize>],
        mask: Vec<f32>,
        cache: &mut KvCache,
        mut collect: Option<&mut Vec<Tensor<3>>>,
    ) -> Result<Tensor<3>> {
        if self.prompt_path == PromptPath::Host && crate::device::is_cpu(&self.device) {
            return host::run(self, tokens, b, s, positions, &mask, cache, collect);
        }
        let total = cache
            .layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map_or(0, |k| k.dims()[2])
            + s;
        let device = &self.device;
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [b, 1, s, total]), device);
        let (cos, sin) = self.rope.tables(positions, device);
        let flat: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * s]), device);
        let hidden = self.config.hidden_size;
        let mut x = self
            .embed_tokens
            .clone()
            .select(0, ids)
            .reshape([b, s, hidden]);
        if let Some(c) = collect.as_deref_mut() {
            c.push(x.clone());
        }
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&self.config, &self.rope, x, lc, &cos, &sin, &mask);
            if let Some(c) = collect.as_deref_mut() {
                c.push(x.clone());
            }
        }
        Ok(self.norm.forward(x))
    }

    /// Runs one row of new tokens after a batch-1 cache, with explicit positions and visibility among
    /// the new tokens (`visible[i][j]`: new token `i` sees new token `j`; every cached position is
    /// visible). Used to score many candidate continuations in one pass as a tree over a shared prompt.
    /// The cache's bookkeeping is not updated: use a copy and drop it afterwards.
    pub fn forward_tree(
        &self,
        tokens: &[u32],
        positions: &[usize],
        visible: &[Vec<bool>],
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let s = tokens.len();
        if cache.batch() != 1 || positions.len() != s || visible.len() != s || s == 0 {
            return Err(ModelError::Input(
                "tree input needs a batch-1 cache and one position and visibility row per token"
                    .into(),
            ));
        }
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if positions.iter().any(|&p| p >= self.rope.max_positions) {
            return Err(ModelError::Input(format!(
                "a position exceeds the model's context of {}",
                self.rope.max_positions
            )));
        }
        let past = cache.len();
        let total = past + s;
        let mut mask = vec![0f32; s * total];
        for i in 0..s {
            for j in 0..past {
                if !cache.valid[0][j] {
                    mask[i * total + j] = -1e30;
                }
            }
            for j in 0..s {
                if !visible[i].get(j).copied().unwrap_or(false) {
                    mask[i * total + past + j] = -1e30;
                }
            }
        }
        self.run(tokens, 1, s, &[positions.to_vec()], mask, cache, None)
    }

    /// Logits for hidden states `[b, s, hidden]` → `[b, s, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = hidden.dims();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden
            .reshape([b * s, d])
            .matmul(head.clone().transpose())
            .reshape([b, s, self.config.vocab_size])
    }

    /// Runs new tokens and returns the logits of the last position of every row, `[b, vocab]`.
    pub fn forward_last(&self, input: &StepInput, cache: &mut KvCache) -> Result<Tensor<2>> {
        let hidden = self.forward_hidden(input, cache, None)?;
        let [b, s, _] = hidden.dims();
        let last = hidden.narrow(1, s - 1, 1);
        Ok(self.logits(last).reshape([b, self.config.vocab_size]))
    }
}
