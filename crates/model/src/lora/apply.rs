//! Using an adapter with a base model: attached as a separate low-rank path (the base untouched, so
//! several adapters can share it), merged into the weights (`W + s·B·A`) for plain inference, or merged
//! while the weights are read ([`MergedSource`]).

use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};

use super::adapter::Adapter;
use super::config::Target;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::llama::{DecoderLayer, Linear, Llama, LoraDelta};
use crate::loader::{RawTensor, TensorSource};
use crate::weight::BaseWeight;

impl DecoderLayer {
    /// The projection `target` of this layer.
    pub fn linear(&self, target: Target) -> &Linear {
        match target {
            Target::QProj => &self.self_attn.q_proj,
            Target::KProj => &self.self_attn.k_proj,
            Target::VProj => &self.self_attn.v_proj,
            Target::OProj => &self.self_attn.o_proj,
            Target::GateProj => &self.mlp.gate_proj,
            Target::UpProj => &self.mlp.up_proj,
            Target::DownProj => &self.mlp.down_proj,
        }
    }

    /// The projection `target` of this layer, mutable.
    pub fn linear_mut(&mut self, target: Target) -> &mut Linear {
        match target {
            Target::QProj => &mut self.self_attn.q_proj,
            Target::KProj => &mut self.self_attn.k_proj,
            Target::VProj => &mut self.self_attn.v_proj,
            Target::OProj => &mut self.self_attn.o_proj,
            Target::GateProj => &mut self.mlp.gate_proj,
            Target::UpProj => &mut self.mlp.up_proj,
            Target::DownProj => &mut self.mlp.down_proj,
        }
    }
}

/// A copy of `base` with `adapter` attached as unmerged LoRA paths. Base tensors are shared, not
/// copied, so one base in memory serves any number of attached adapters.
pub fn attach(base: &Llama, adapter: &Adapter) -> Result<Llama> {
    adapter.validate_for(&base.config)?;
    let mut llama = base.clone();
    let r = adapter.config.r;
    for (&(layer, target), pair) in &adapter.weights {
        let [out, inp] = target.shape(&base.config);
        let linear = llama.layers[layer].linear_mut(target);
        linear.lora = Some(Arc::new(LoraDelta {
            a: Tensor::from_data(TensorData::new(pair.a.clone(), [r, inp]), &base.device),
            b: Tensor::from_data(TensorData::new(pair.b.clone(), [out, r]), &base.device),
            scale: adapter.config.scale(),
        }));
    }
    Ok(llama)
}

fn add_delta(llama: &mut Llama, adapter: &Adapter, sign: f32) -> Result<()> {
    adapter.validate_for(&llama.config)?;
    let config = llama.config.clone();
    for &(layer, target) in adapter.weights.keys() {
        let [out, inp] = target.shape(&config);
        let Some(mut delta) = adapter.delta(layer, target, &config) else {
            continue;
        };
        if sign != 1.0 {
            delta.iter_mut().for_each(|d| *d *= sign);
        }
        let device = llama.device.clone();
        let linear = llama.layers[layer].linear_mut(target);
        // A quantized weight is dequantized first: the merged weight is f32.
        linear.weight = BaseWeight::F32(
            linear.weight.tensor(&device)
                + Tensor::<2>::from_data(TensorData::new(delta, [out, inp]), &device),
        );
    }
    Ok(())
}

/// Adds `s·B·A` of every adapted projection to the base weights.
pub fn merge(llama: &mut Llama, adapter: &Adapter) -> Result<()> {
    add_delta(llama, adapter, 1.0)
}

/// Subtracts what [`merge`] added (exact up to f32 rounding).
pub fn unmerge(llama: &mut Llama, adapter: &Adapter) -> Result<()> {
    add_delta(llama, adapter, -1.0)
}

/// A [`TensorSource`] that hands out base weights with an adapter merged in. Adapted projections come
/// out as f32 (so the decode path keeps them unquantized); everything else passes through.
pub struct MergedSource<'a> {
    /// Where the base weights come from.
    pub base: &'a dyn TensorSource,
    /// The adapter merged in.
    pub adapter: &'a Adapter,
    /// The base's configuration.
    pub config: &'a ModelConfig,
}

impl MergedSource<'_> {
    /// The `(layer, target)` a Hugging Face weight name refers to, when the adapter adapts it.
    fn site(&self, name: &str) -> Option<(usize, Target)> {
        let (layer, target) = crate::names::parse_proj_weight(name)?;
        self.adapter
            .weights
            .contains_key(&(layer, target))
            .then_some((layer, target))
    }
}

impl TensorSource for MergedSource<'_> {
    fn tensor(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some((mut values, shape)) = self.base.tensor(name)? else {
            return Ok(None);
        };
        if let Some((layer, target)) = self.site(name) {
            if let Some(delta) = self.adapter.delta(layer, target, self.config) {
                if delta.len() == values.len() {
                    values.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
                }
            }
        }
        Ok(Some((values, shape)))
    }

    fn raw(&self, name: &str) -> Result<Option<RawTensor>> {
        if self.site(name).is_some() {
            return Ok(None);
        }
        self.base.raw(name)
    }

    fn raw_is_permuted(&self) -> bool {
        self.base.raw_is_permuted()
    }
}
