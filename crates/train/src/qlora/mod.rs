//! The model being fine-tuned: a frozen base (f32, int8 or NF4 linear weights; f32 embeddings and norms,
//! as QLoRA keeps them) plus a LoRA [`Adapter`], with the loss and its gradients for a batch.
//!
//! Design: the forward pass runs layer by layer without autodiff, keeping what each layer's backward
//! reads (its activations, see `backprop`); the loss is computed in chunks, so the 49k-wide logits
//! exist only for a chunk of target positions at a time. Backward walks the layers in reverse: it
//! dequantizes that layer's weights again and applies the hand-written backward of `backprop`, so
//! gradients reach the input and the LoRA factors but never the frozen weights, and at most one
//! layer's dequantized weights are alive at a time.
//!
//! On the CPU backend that step runs on host buffers (`host`: GEMM products — faer's x86-64 kernels, or
//! the `gemm` crate off x86-64 — fused row loops, LoRA's thin products in single passes in `low_rank`);
//! `backprop` is the same step in Burn tensor ops, for other devices and as the reference the tests hold
//! the host path to.
//!
//! Three step paths plug into one driver (`driver.rs`, [`StepPath`]): host buffers, Burn tensor ops
//! with stored activations, or layers recomputed under autodiff (for one layer's activations in memory
//! instead of all of them: large models on small machines).

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::{Device, Gradients, IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;

use supportlm_model::cache::LayerCache;
use supportlm_model::config::ModelConfig;
use supportlm_model::error::{ModelError, Result};
use supportlm_model::llama::{
    to_vec, Attention, DecoderLayer, Linear, LoraDelta, Mlp, RmsNorm, Rope,
};
use supportlm_quant::BaseQuant;

use dropout::{dropout_mask, DroppedLora, TrainLayer};
use supportlm_model::loader::TensorSource;
use supportlm_model::lora::{Adapter, LoraPair, Target};
use supportlm_model::names;

mod backprop;
mod driver;
mod dropout;
mod factors;
mod full;
mod host;
mod layout;
mod low_rank;
mod pointwise;
mod recompute;
mod saved;

use driver::drive;
use layout::Layout;

pub use driver::StepPath;
pub use dropout::{splitmix, Dropout};
pub use factors::DeviceFactors;
pub use full::{FullStep, ParamInfo};
pub use supportlm_model::weight::BaseWeight;

/// One training sequence: token ids and which of them are predicted (`loss_mask[t]`: the loss includes
/// predicting `ids[t]` from `ids[..t]`; `loss_mask[0]` is ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `loss_mask[t]`: the loss includes predicting `ids[t]`.
    pub loss_mask: Vec<bool>,
}

impl Sequence {
    /// Positions whose token is predicted.
    pub fn targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Loss of a batch: the summed cross-entropy over target tokens and how many there were.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSum {
    /// Summed cross-entropy (nats) over the target tokens.
    pub sum: f64,
    /// How many target tokens.
    pub tokens: usize,
}

/// [`LossSum`] and the gradient of `sum` for every adapter pair (same keys and layout as the adapter).
#[derive(Debug, Clone)]
pub struct StepGrads {
    /// The batch's summed loss.
    pub loss: LossSum,
    /// Gradient of the summed loss for each adapter pair.
    pub grads: BTreeMap<(usize, Target), LoraPair>,
}

/// How big the frozen base is.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BaseFootprint {
    /// Parameters of the quantized linear projections.
    pub linear_params: usize,
    /// Bytes those projections occupy.
    pub linear_bytes: usize,
    /// Parameters outside the linear projections (embeddings, norms, biases, untied LM head).
    pub other_params: usize,
    /// Bytes those occupy (norms and biases f32; embeddings and head f32 for the plain base, bf16 for
    /// the quantized ones, as QLoRA keeps them in 16 bits).
    pub other_bytes: usize,
}

impl BaseFootprint {
    /// Bits per parameter of the linear projections.
    pub fn bits_per_linear_param(&self) -> f64 {
        8.0 * self.linear_bytes as f64 / self.linear_params.max(1) as f64
    }

    /// Resident bytes of the whole base.
    pub fn total_bytes(&self) -> usize {
        self.linear_bytes + self.other_bytes
    }
}

/// Rows of the vocabulary (embeddings / LM head): f32 for the plain LoRA base, bf16 for the
/// quantized bases (QLoRA keeps these modules in 16 bits), converted a block of rows at a time.
/// (Two of these exist per model, so the variants' size difference does not matter.)
#[allow(clippy::large_enum_variant)]
enum Table {
    F32(Tensor<2>),
    Bf16 {
        rows: usize,
        cols: usize,
        data: Vec<half::bf16>,
    },
}

/// Vocabulary rows converted per block when the table is bf16.
const TABLE_BLOCK: usize = 8192;

/// `(start, len)` of consecutive blocks of [`TABLE_BLOCK`] rows covering `rows`.
fn row_blocks(rows: usize) -> Vec<(usize, usize)> {
    (0..rows)
        .step_by(TABLE_BLOCK)
        .map(|s| (s, TABLE_BLOCK.min(rows - s)))
        .collect()
}

/// bf16 values as f32: the bf16 bits are the high half of the f32's, so this is exact (NaN payloads
/// included) and a plain shift that vectorizes.
fn widen(values: &[half::bf16]) -> impl Iterator<Item = f32> + '_ {
    values
        .iter()
        .map(|v| f32::from_bits((v.to_bits() as u32) << 16))
}

impl Table {
    /// The table for a `quant` base on `device`. A quantized base's table holds bf16 values; on a GPU
    /// they are kept there widened to f32 (the same values, twice the bytes), so no step uploads the
    /// table from the host.
    fn new(values: Vec<f32>, rows: usize, cols: usize, quant: BaseQuant, device: &Device) -> Self {
        let on_host = supportlm_model::device::is_cpu(device);
        match quant {
            BaseQuant::None => Table::F32(Tensor::from_data(
                TensorData::new(values, [rows, cols]),
                device,
            )),
            _ if !on_host => {
                let rounded = values
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect();
                Table::F32(Tensor::from_data(
                    TensorData::new(rounded, [rows, cols]),
                    device,
                ))
            }
            _ => Table::Bf16 {
                rows,
                cols,
                data: values.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Table::F32(t) => 4 * t.dims().iter().product::<usize>(),
            Table::Bf16 { data, .. } => 2 * data.len(),
        }
    }

    fn params(&self) -> usize {
        match self {
            Table::F32(t) => t.dims().iter().product(),
            Table::Bf16 { data, .. } => data.len(),
        }
    }

    /// Rows `ids` as `[ids.len(), cols]`.
    fn rows(&self, ids: &[i64], device: &Device) -> Tensor<2> {
        match self {
            Table::F32(t) => {
                let idx =
                    Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [ids.len()]), device);
                t.clone().select(0, idx)
            }
            Table::Bf16 { cols, data, .. } => {
                let mut out = Vec::with_capacity(ids.len() * cols);
                for &id in ids {
                    let start = id as usize * cols;
                    out.extend(widen(&data[start..start + cols]));
                }
                Tensor::from_data(TensorData::new(out, [ids.len(), *cols]), device)
            }
        }
    }

    /// Rows `start..start + len` as f32.
    fn block(&self, start: usize, len: usize, device: &Device) -> Tensor<2> {
        match self {
            Table::F32(t) => t.clone().narrow(0, start, len),
            Table::Bf16 { cols, data, .. } => Tensor::from_data(
                TensorData::new(
                    widen(&data[start * cols..(start + len) * cols]).collect(),
                    [len, *cols],
                ),
                device,
            ),
        }
    }

    /// The table as host f32 blocks of [`TABLE_BLOCK`] rows (each `[len, cols]`, row-major).
    fn host_blocks(&self) -> Result<Vec<Vec<f32>>> {
        row_blocks(self.len())
            .into_par_iter()
            .map(|(s, len)| match self {
                Table::F32(t) => to_vec(t.clone().narrow(0, s, len)),
                Table::Bf16 { cols, data, .. } => {
                    Ok(widen(&data[s * cols..(s + len) * cols]).collect())
                }
            })
            .collect()
    }

    /// Rows of the table.
    fn len(&self) -> usize {
        match self {
            Table::F32(t) => t.dims()[0],
            Table::Bf16 { rows, .. } => *rows,
        }
    }

    fn blocks(&self) -> Vec<(usize, usize)> {
        match self {
            Table::F32(t) => vec![(0, t.dims()[0])],
            Table::Bf16 { rows, .. } => row_blocks(*rows),
        }
    }

    /// The table as f32 blocks of rows: with `keep`, converted once (bf16 tables) for the many chunks
    /// of a step; otherwise converted a block at a time whenever used (no f32 copy of the table held).
    fn f32_blocks<'a>(&'a self, device: &Device, keep: bool) -> Blocks<'a> {
        if keep {
            Blocks::Kept(
                self.blocks()
                    .into_iter()
                    .map(|(s, l)| self.block(s, l, device))
                    .collect(),
            )
        } else {
            Blocks::Lazy(self, device.clone())
        }
    }
}

/// A vocabulary table as consecutive f32 blocks of rows (see [`Table::f32_blocks`]).
enum Blocks<'a> {
    Kept(Vec<Tensor<2>>),
    Lazy(&'a Table, Device),
}

impl Blocks<'_> {
    fn each(&self) -> Box<dyn Iterator<Item = Tensor<2>> + '_> {
        match self {
            Blocks::Kept(blocks) => Box::new(blocks.iter().cloned()),
            Blocks::Lazy(table, device) => Box::new(
                table
                    .blocks()
                    .into_iter()
                    .map(move |(s, l)| table.block(s, l, device)),
            ),
        }
    }

    /// `h · Tᵀ`: `[n, cols]` → `[n, rows]`.
    fn logits(&self, h: &Tensor<2>) -> Tensor<2> {
        let parts: Vec<Tensor<2>> = self
            .each()
            .map(|b| h.clone().matmul(b.transpose()))
            .collect();
        Tensor::cat(parts, 1)
    }

    /// `d · T`: `[n, rows]` → `[n, cols]`.
    fn back(&self, d: &Tensor<2>) -> Tensor<2> {
        let mut start = 0;
        let mut sum: Option<Tensor<2>> = None;
        for b in self.each() {
            let len = b.dims()[0];
            let part = d.clone().narrow(1, start, len).matmul(b);
            start += len;
            sum = Some(match sum {
                Some(acc) => acc + part,
                None => part,
            });
        }
        sum.unwrap_or_else(|| Tensor::zeros([d.dims()[0], 1], &d.device()))
    }
}

struct FrozenLinear {
    weight: BaseWeight,
    bias: Option<Tensor<1>>,
}

struct FrozenLayer {
    input_layernorm: Tensor<1>,
    post_attention_layernorm: Tensor<1>,
    /// Indexed like [`Target::ALL`].
    linears: Vec<FrozenLinear>,
}

/// The frozen base for LoRA / QLoRA training.
pub struct QloraModel {
    /// The base's configuration.
    pub config: ModelConfig,
    /// How the linear weights are stored.
    pub quant: BaseQuant,
    embed_tokens: Table,
    norm: Tensor<1>,
    lm_head: Option<Table>,
    layers: Vec<FrozenLayer>,
    rope: Rope,
    device: Device,
    /// Target positions per cross-entropy chunk (bounds the live logits to `chunk × vocab`).
    pub loss_chunk: usize,
    /// Pack a batch's sequences around their shared prompt prefix (see `layout`); on by default.
    pub pack: bool,
    /// How a LoRA step runs (see [`StepPath`]): by default on host buffers on the CPU backend and
    /// in Burn tensor ops elsewhere, both keeping every layer's activations.
    pub step_path: StepPath,
}

fn tensor1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn target_index(t: Target) -> usize {
    Target::ALL.iter().position(|&x| x == t).unwrap_or(0)
}

impl QloraModel {
    /// Reads the base one tensor at a time from `src` and stores the linear weights as `quant` says
    /// (never holding the whole f32 model).
    pub fn load(
        src: &dyn TensorSource,
        config: &ModelConfig,
        quant: BaseQuant,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let c = config;
        let need = |name: &str, shape: &[usize]| src.require(name, shape);
        let hidden = c.hidden_size;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let ln = names::layer(i);
            let mut linears = Vec::with_capacity(7);
            for t in Target::ALL {
                let [out, inp] = t.shape(c);
                let p = ln.proj(t);
                let values = need(&p.weight(), &[out, inp])?;
                let bias = if t.has_bias(c) {
                    Some(tensor1(need(&p.bias(), &[out])?, device))
                } else {
                    None
                };
                linears.push(FrozenLinear {
                    weight: BaseWeight::new(values, out, inp, quant, device),
                    bias,
                });
            }
            layers.push(FrozenLayer {
                input_layernorm: tensor1(need(&ln.input_norm(), &[hidden])?, device),
                post_attention_layernorm: tensor1(
                    need(&ln.post_attention_norm(), &[hidden])?,
                    device,
                ),
                linears,
            });
        }
        let t2 = |v: Vec<f32>, rows: usize| Table::new(v, rows, hidden, quant, device);
        let embed_tokens = t2(
            need(names::EMBED_TOKENS, &[c.vocab_size, hidden])?,
            c.vocab_size,
        );
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(t2(
                need(names::LM_HEAD, &[c.vocab_size, hidden])?,
                c.vocab_size,
            ))
        };
        Ok(QloraModel {
            config: config.clone(),
            quant,
            embed_tokens,
            norm: tensor1(need(names::FINAL_NORM, &[hidden])?, device),
            lm_head,
            layers,
            rope: Rope::for_config(c, device),
            device: device.clone(),
            loss_chunk: 256,
            pack: true,
            step_path: StepPath::choose(true, device),
        })
    }

    /// The device the base lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters and resident bytes of the base.
    pub fn footprint(&self) -> BaseFootprint {
        let mut linear_params = 0;
        let mut linear_bytes = 0;
        let mut other = 0;
        for layer in &self.layers {
            other += 2 * self.config.hidden_size;
            for l in &layer.linears {
                let [o, i] = l.weight.dims();
                linear_params += o * i;
                linear_bytes += l.weight.resident_bytes();
                other += l.bias.as_ref().map_or(0, |b| b.dims()[0]);
            }
        }
        other += self.config.hidden_size;
        let tables = std::iter::once(&self.embed_tokens).chain(self.lm_head.as_ref());
        let table_params: usize = tables.clone().map(Table::params).sum();
        let table_bytes: usize = tables.map(Table::bytes).sum();
        BaseFootprint {
            linear_params,
            linear_bytes,
            other_params: other + table_params,
            other_bytes: 4 * other + table_bytes,
        }
    }

    /// One layer as a [`TrainLayer`]: weights dequantized now, LoRA factors from `lora` (already on
    /// the right device, tracked or not) and dropout masks for `rows` input rows.
    fn layer(
        &self,
        index: usize,
        lora: &BTreeMap<Target, (Tensor<2>, Tensor<2>)>,
        scale: f64,
        dropout: Option<Dropout>,
        rows: usize,
    ) -> TrainLayer {
        let frozen = &self.layers[index];
        let linear = |t: Target| {
            let f = &frozen.linears[target_index(t)];
            Linear::new(f.weight.tensor(&self.device), f.bias.clone())
        };
        let norm = |w: &Tensor<1>| RmsNorm {
            weight: w.clone(),
            eps: self.config.rms_norm_eps,
        };
        let base = DecoderLayer {
            input_layernorm: norm(&frozen.input_layernorm),
            self_attn: Attention {
                q_proj: linear(Target::QProj),
                k_proj: linear(Target::KProj),
                v_proj: linear(Target::VProj),
                o_proj: linear(Target::OProj),
            },
            post_attention_layernorm: norm(&frozen.post_attention_layernorm),
            mlp: Mlp {
                gate_proj: linear(Target::GateProj),
                up_proj: linear(Target::UpProj),
                down_proj: linear(Target::DownProj),
            },
        };
        let updates = Target::ALL.map(|t| {
            let (a, b) = lora.get(&t)?;
            let mask = dropout.filter(|d| d.p > 0.0).map(|d| {
                let cols = t.shape(&self.config)[1];
                dropout_mask(d, index, t, rows, cols, &self.device)
            });
            Some(Arc::new(DroppedLora {
                delta: LoraDelta {
                    a: a.clone(),
                    b: b.clone(),
                    scale,
                },
                mask,
            }))
        });
        TrainLayer::new(base, updates)
    }

    /// Checks `batch` and lays it out (packed around a shared prefix, or padded).
    fn check_batch(&self, batch: &[Sequence]) -> Result<Layout> {
        if batch.is_empty() {
            return Err(ModelError::Input("empty training batch".into()));
        }
        let s = batch.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        if s < 2 {
            return Err(ModelError::Input(
                "training sequences need at least two tokens".into(),
            ));
        }
        if s > self.rope.max_positions {
            return Err(ModelError::Input(format!(
                "a training sequence has {s} tokens, more than the model's context of {}",
                self.rope.max_positions
            )));
        }
        let vocab = self.config.vocab_size as u32;
        for q in batch {
            if q.loss_mask.len() != q.ids.len() {
                return Err(ModelError::Input(
                    "loss mask and token ids differ in length".into(),
                ));
            }
            if let Some(bad) = q.ids.iter().find(|&&t| t >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
        }
        let layout = if self.pack {
            Layout::choose(batch)
        } else {
            Layout::padded(batch)
        };
        Ok(layout)
    }

    /// Summed loss and LoRA gradients for `batch`, through [`QloraModel::step_path`], on the host.
    pub fn loss_and_grads(
        &self,
        adapter: &Adapter,
        batch: &[Sequence],
        dropout: Option<Dropout>,
    ) -> Result<StepGrads> {
        adapter.validate_for(&self.config)?;
        let layout = self.check_batch(batch)?;
        let step = driver::StepInputs {
            model: self,
            layout: &layout,
            dropout,
        };
        match self.effective_step_path() {
            // On a worker of rayon's pool: the step's hundreds of parallel sections then split their
            // work there, where the caller's thread would hand each one over and sleep until it is
            // done (two context switches per section).
            path @ StepPath::Host => rayon::scope(|_| {
                let (loss, grads) = drive(
                    &mut host::HostPass::new(step, adapter),
                    self.layers.len(),
                    path,
                )?;
                Ok(StepGrads { loss, grads })
            }),
            path => {
                let factors = DeviceFactors::upload(adapter, &self.device);
                let (loss, flat) = self.device_step(step, &factors, path)?;
                let grads = factors.split(&to_vec(flat)?)?;
                Ok(StepGrads { loss, grads })
            }
        }
    }

    /// Summed loss of `batch` and the gradient of every factor in `factors`, flat in their layout
    /// (the optimizer's order), left on the device: the step of a run whose adapter lives there. Runs
    /// [`StepPath::Saved`] unless the model recomputes layers.
    pub fn device_loss_and_grads(
        &self,
        factors: &DeviceFactors,
        batch: &[Sequence],
        dropout: Option<Dropout>,
    ) -> Result<(LossSum, Tensor<1>)> {
        let layout = self.check_batch(batch)?;
        let step = driver::StepInputs {
            model: self,
            layout: &layout,
            dropout,
        };
        let path = match self.step_path {
            StepPath::Recompute => StepPath::Recompute,
            StepPath::Host | StepPath::Saved => StepPath::Saved,
        };
        self.device_step(step, factors, path)
    }

    /// A step through the tensor-op paths, gradients flattened on the device.
    fn device_step(
        &self,
        step: driver::StepInputs,
        factors: &DeviceFactors,
        path: StepPath,
    ) -> Result<(LossSum, Tensor<1>)> {
        let layers = self.layers.len();
        let (loss, grads) = match path {
            StepPath::Recompute => drive(
                &mut recompute::RecomputePass::new(step, factors),
                layers,
                path,
            )?,
            StepPath::Host | StepPath::Saved => {
                drive(&mut saved::SavedPass::new(step, factors), layers, path)?
            }
        };
        Ok((loss, factors.flatten(grads)?))
    }

    /// The path a step takes: [`QloraModel::step_path`], with the host path only on the CPU backend.
    pub fn effective_step_path(&self) -> StepPath {
        match self.step_path {
            StepPath::Host if !supportlm_model::device::is_cpu(&self.device) => StepPath::Saved,
            path => path,
        }
    }

    /// Summed loss of `batch` with `adapter` (no dropout, no gradients): validation.
    pub fn loss(&self, adapter: Option<&Adapter>, batch: &[Sequence]) -> Result<LossSum> {
        let factors = match adapter {
            Some(a) => {
                a.validate_for(&self.config)?;
                Some(DeviceFactors::upload(a, &self.device))
            }
            None => None,
        };
        self.device_loss(factors.as_ref(), batch)
    }

    /// [`Self::loss`] with an adapter already on the device.
    pub fn device_loss(
        &self,
        factors: Option<&DeviceFactors>,
        batch: &[Sequence],
    ) -> Result<LossSum> {
        let layout = self.check_batch(batch)?;
        let (cos, sin, mask) = layout.tensors(&self.rope, &self.device);
        let (x, _) = self.forward_layers(&layout, factors, (&cos, &sin, &mask), false);
        Ok(self.head_loss(x, &layout, false)?.0)
    }

    /// Runs every layer without autodiff (with the LoRA `factors` when given) and returns the last
    /// layer's output and, with `keep`, every layer's input.
    fn forward_layers(
        &self,
        layout: &Layout,
        factors: Option<&DeviceFactors>,
        tables: (&Tensor<4>, &Tensor<4>, &Tensor<4>),
        keep: bool,
    ) -> (Tensor<3>, Vec<Tensor<3>>) {
        let mut xs = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        let mut x = self.embed(layout);
        for l in 0..self.layers.len() {
            let (lora, scale) = match factors {
                Some(f) => (f.layer(l, false), f.config().scale()),
                None => (BTreeMap::new(), 0.0),
            };
            let layer = self.layer(l, &lora, scale, None, layout.rows());
            let next = self.run_layer(&layer.base, x.clone(), tables);
            if keep {
                xs.push(x);
            }
            x = next;
        }
        (x, xs)
    }

    /// One layer's forward pass over a whole batch (no KV cache kept), with the batch's RoPE tables and
    /// mask.
    fn run_layer(
        &self,
        layer: &DecoderLayer,
        x: Tensor<3>,
        (cos, sin, mask): (&Tensor<4>, &Tensor<4>, &Tensor<4>),
    ) -> Tensor<3> {
        layer.forward(
            &self.config,
            &self.rope,
            x,
            &mut LayerCache::default(),
            cos,
            sin,
            mask,
        )
    }

    /// Re-runs `layer` on `x_in` on the autodiff device and back-propagates `grad` from its output:
    /// the gradients (for whatever the layer tracks) and the gradient at its input.
    fn backward_through(
        &self,
        layer: &DecoderLayer,
        x_in: Tensor<3>,
        grad: Tensor<3>,
        (cos, sin, mask): (&Tensor<4>, &Tensor<4>, &Tensor<4>),
    ) -> Result<(Gradients, Tensor<3>)> {
        let x_ad = x_in.autodiff().require_grad();
        let out = self.run_layer(layer, x_ad.clone(), (cos, sin, mask));
        let g = (out * grad).sum().backward();
        let dx = x_ad
            .grad(&g)
            .ok_or_else(|| ModelError::Internal("no gradient reached the layer input".into()))?;
        Ok((g, dx))
    }

    fn embed(&self, layout: &Layout) -> Tensor<3> {
        self.embed_tokens.rows(&layout.ids, &self.device).reshape([
            layout.b,
            layout.s,
            self.config.hidden_size,
        ])
    }

    /// Final norm, LM head and cross-entropy over the target positions, in chunks. With `want_grad`,
    /// also the gradient of the summed loss with respect to `x` (`[b, s, hidden]`).
    fn head_loss(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        want_grad: bool,
    ) -> Result<(LossSum, Option<Tensor<3>>)> {
        let out = self.head(x, layout, want_grad, false)?;
        Ok((out.loss, out.dx))
    }

    /// [`Self::head_loss`], and with `full` also the gradients of the final norm and of the LM head
    /// table (the embeddings when tied): full fine-tuning.
    fn head(&self, x: Tensor<3>, layout: &Layout, want_grad: bool, full: bool) -> Result<HeadOut> {
        let (b, s) = (layout.b, layout.s);
        let hidden = self.config.hidden_size;
        // Hidden state at t-1 predicts ids[t] (a packed prefix token may predict several targets).
        let (rows, targets): (Vec<i64>, Vec<i64>) = layout.targets.iter().copied().unzip();
        let m = rows.len();
        let vocab = self.config.vocab_size;
        if m == 0 {
            return Ok(HeadOut {
                loss: LossSum {
                    sum: 0.0,
                    tokens: 0,
                },
                dx: None,
                dnorm: None,
                dhead: None,
            });
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [m]), &self.device);
        let selected = x.reshape([b * s, hidden]).select(0, idx.clone());
        let selected = if want_grad {
            selected.autodiff().require_grad()
        } else {
            selected
        };
        let norm_weight = if full {
            self.norm.clone().autodiff().require_grad()
        } else {
            self.norm.clone()
        };
        let norm = RmsNorm {
            weight: norm_weight.clone(),
            eps: self.config.rms_norm_eps,
        };
        let h = norm
            .forward(selected.clone().unsqueeze_dim::<3>(0))
            .reshape([m, hidden]);
        let h_plain = h.clone().inner();

        // The memory-lean path keeps no f32 copy of a bf16 table.
        let table = head.f32_blocks(&self.device, self.step_path != StepPath::Recompute);
        let mut sum = 0f64;
        let mut dh_chunks = Vec::new();
        let mut dhead: Option<Tensor<2>> = None;
        // On the CPU the cross-entropy runs in the host's row loops; on another device in tensor ops
        // there, its sum read back once per call.
        let on_host = supportlm_model::device::is_cpu(&self.device);
        let mut device_sum: Option<Tensor<1>> = None;
        for start in (0..m).step_by(self.loss_chunk.max(1)) {
            let len = self.loss_chunk.max(1).min(m - start);
            let hc = h_plain.clone().narrow(0, start, len);
            let chunk_targets = &targets[start..start + len];
            let dlogits = if on_host {
                let mut logits = to_vec(table.logits(&hc))?;
                let tgt: Vec<usize> = chunk_targets.iter().map(|&t| t as usize).collect();
                sum += pointwise::cross_entropy(&mut logits, vocab, &tgt, want_grad);
                // softmax − one-hot of the target.
                want_grad.then(|| {
                    Tensor::<2>::from_data(TensorData::new(logits, [len, vocab]), &self.device)
                })
            } else {
                let (chunk_sum, dlogits) =
                    device_cross_entropy(table.logits(&hc), chunk_targets, want_grad);
                device_sum = Some(match device_sum.take() {
                    Some(acc) => acc + chunk_sum,
                    None => chunk_sum,
                });
                dlogits
            };
            if let Some(dlogits) = dlogits {
                dh_chunks.push(table.back(&dlogits));
                if full {
                    let d = dlogits.transpose().matmul(hc);
                    dhead = Some(match dhead.take() {
                        Some(acc) => acc + d,
                        None => d,
                    });
                }
            }
        }
        if let Some(total) = device_sum {
            supportlm_model::device::note_read(&self.device, 1);
            sum += f64::from(total.into_scalar::<f32>());
        }
        let loss = LossSum { sum, tokens: m };
        if !want_grad {
            return Ok(HeadOut {
                loss,
                dx: None,
                dnorm: None,
                dhead: None,
            });
        }
        let dh = Tensor::cat(dh_chunks, 0);
        let g = (h * dh).sum().backward();
        let dsel = selected
            .grad(&g)
            .ok_or_else(|| ModelError::Internal("no gradient reached the final norm".into()))?;
        let full_dx = Tensor::<2>::zeros([b * s, hidden], &self.device).select_assign(
            0,
            idx,
            dsel,
            IndexingUpdateOp::Add,
        );
        let dnorm = if full { norm_weight.grad(&g) } else { None };
        Ok(HeadOut {
            loss,
            dx: Some(full_dx.reshape([b, s, hidden])),
            dnorm,
            dhead,
        })
    }
}

/// Cross-entropy of each row of `logits` (`[rows, vocab]`) against its target, on the logits' device:
/// the summed loss as a one-value tensor there and, with `want_grad`, its gradient
/// `softmax(row) − one_hot(target)` ([`pointwise::cross_entropy`] on the host).
fn device_cross_entropy(
    logits: Tensor<2>,
    targets: &[i64],
    want_grad: bool,
) -> (Tensor<1>, Option<Tensor<2>>) {
    let [rows, vocab] = logits.dims();
    let device = logits.device();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [rows, 1]), &device);
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    let sum = logp.clone().gather(1, idx.clone()).sum().neg();
    let grad = want_grad.then(|| {
        let ones = Tensor::<2>::ones([rows, 1], &device);
        let one_hot =
            Tensor::<2>::zeros([rows, vocab], &device).scatter(1, idx, ones, IndexingUpdateOp::Add);
        logp.exp() - one_hot
    });
    (sum, grad)
}

/// What [`QloraModel::head`] returns.
struct HeadOut {
    loss: LossSum,
    /// Gradient at the last layer's output, `[b, s, hidden]`.
    dx: Option<Tensor<3>>,
    /// Gradient of the final norm's weight (full fine-tuning).
    dnorm: Option<Tensor<1>>,
    /// Gradient of the LM head table, `[vocab, hidden]` (full fine-tuning).
    dhead: Option<Tensor<2>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_table_in_blocks_equals_one_f32_matmul() {
        let device = supportlm_model::default_device();
        let (rows, cols) = (TABLE_BLOCK + 1000, 4);
        // Values exactly representable in bf16, so both tables hold the same numbers.
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
            .collect();
        let f32_table = Table::new(values.clone(), rows, cols, BaseQuant::None, &device);
        let bf16_table = Table::new(values, rows, cols, BaseQuant::Nf4, &device);
        assert_eq!(bf16_table.blocks().len(), 2);
        let h = Tensor::<2>::from_data(
            TensorData::new(
                vec![0.5f32, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.75],
                [2, cols],
            ),
            &device,
        );
        let (f32_blocks, bf16_blocks) = (
            f32_table.f32_blocks(&device, true),
            bf16_table.f32_blocks(&device, false),
        );
        let a = to_vec(f32_blocks.logits(&h)).unwrap();
        let b = to_vec(bf16_blocks.logits(&h)).unwrap();
        assert_eq!(a.len(), 2 * rows);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
        let d = f32_blocks.logits(&h);
        let a = to_vec(f32_blocks.back(&d)).unwrap();
        let b = to_vec(bf16_blocks.back(&d)).unwrap();
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() < 1e-2 * x.abs().max(1.0)));
        let picked = to_vec(bf16_table.rows(&[3, TABLE_BLOCK as i64 + 5], &device)).unwrap();
        let want = to_vec(f32_table.rows(&[3, TABLE_BLOCK as i64 + 5], &device)).unwrap();
        assert_eq!(picked, want);
        assert_eq!(bf16_table.bytes() * 2, f32_table.bytes());
    }
}
