//! A LoRA adapter's factors as one flat tensor on the training device, in the optimizer's order (each
//! adapted `(layer, projection)` in key order, its `A` then its `B`), so that a step on a GPU reads its
//! factors from there and its gradient lands in the same layout: AdamW then updates the whole adapter
//! with a handful of element-wise ops, and nothing crosses to the host until a checkpoint.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};
use supportlm_model::error::{ModelError, Result};
use supportlm_model::llama::to_vec;
use supportlm_model::lora::{Adapter, LoraConfig, LoraPair, Target};

/// Where one adapted projection's factors lie in the flat tensor.
#[derive(Debug, Clone)]
struct Site {
    a: Range<usize>,
    a_shape: [usize; 2],
    b: Range<usize>,
    b_shape: [usize; 2],
}

/// The factors of every adapted projection, flat, on one device.
#[derive(Debug, Clone)]
pub struct DeviceFactors {
    config: LoraConfig,
    values: Tensor<1>,
    sites: BTreeMap<(usize, Target), Site>,
}

impl DeviceFactors {
    /// Uploads `adapter`'s factors to `device` (one transfer).
    pub fn upload(adapter: &Adapter, device: &Device) -> Self {
        let mut sites = BTreeMap::new();
        let mut flat = Vec::with_capacity(
            adapter
                .weights
                .values()
                .map(|p| p.a.len() + p.b.len())
                .sum(),
        );
        let r = adapter.config.r;
        for (&key, pair) in &adapter.weights {
            let (out, inp) = (pair.b.len() / r.max(1), pair.a.len() / r.max(1));
            let start = flat.len();
            flat.extend_from_slice(&pair.a);
            let middle = flat.len();
            flat.extend_from_slice(&pair.b);
            sites.insert(
                key,
                Site {
                    a: start..middle,
                    a_shape: [r, inp],
                    b: middle..flat.len(),
                    b_shape: [out, r],
                },
            );
        }
        let n = flat.len();
        DeviceFactors {
            config: adapter.config.clone(),
            values: Tensor::from_data(TensorData::new(flat, [n]), device),
            sites,
        }
    }

    /// Rank, scaling and targets.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Trainable values.
    pub fn len(&self) -> usize {
        self.values.dims()[0]
    }

    /// Whether the adapter adapts nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every factor, flat.
    pub fn values(&self) -> Tensor<1> {
        self.values.clone()
    }

    /// Replaces every factor (an optimizer update: same length, same layout).
    pub fn set_values(&mut self, values: Tensor<1>) -> Result<()> {
        if values.dims() != self.values.dims() {
            return Err(ModelError::Internal(format!(
                "adapter update of {:?} values for an adapter of {}",
                values.dims(),
                self.len()
            )));
        }
        self.values = values;
        Ok(())
    }

    /// Layer `l`'s factors as `[r, in]` and `[out, r]` tensors, tracked by autodiff when `track`.
    pub(super) fn layer(&self, l: usize, track: bool) -> BTreeMap<Target, (Tensor<2>, Tensor<2>)> {
        let cut = |range: &Range<usize>, shape: [usize; 2]| {
            let x = self
                .values
                .clone()
                .narrow(0, range.start, range.len())
                .reshape(shape);
            if track {
                x.autodiff().require_grad()
            } else {
                x
            }
        };
        self.sites
            .range((l, Target::QProj)..=(l, Target::DownProj))
            .map(|(&(_, t), s)| (t, (cut(&s.a, s.a_shape), cut(&s.b, s.b_shape))))
            .collect()
    }

    /// Per-site gradients `(dA, dB)` (any shapes holding the factors' counts) as one flat tensor in
    /// this layout; every site must have one.
    pub(super) fn flatten(
        &self,
        mut grads: BTreeMap<(usize, Target), (Tensor<1>, Tensor<1>)>,
    ) -> Result<Tensor<1>> {
        let mut parts = Vec::with_capacity(2 * self.sites.len());
        for (key, site) in &self.sites {
            let (da, db) = grads.remove(key).ok_or_else(|| {
                ModelError::Internal(format!(
                    "LoRA factors of layer {} {} received no gradient",
                    key.0, key.1
                ))
            })?;
            if da.dims()[0] != site.a.len() || db.dims()[0] != site.b.len() {
                return Err(ModelError::Internal(format!(
                    "gradient of layer {} {} has the wrong size",
                    key.0, key.1
                )));
            }
            parts.extend([da, db]);
        }
        if parts.is_empty() {
            return Ok(self.values.zeros_like());
        }
        Ok(Tensor::cat(parts, 0))
    }

    /// Host values in this layout as per-site pairs (what an adapter or its gradients hold).
    pub fn split(&self, flat: &[f32]) -> Result<BTreeMap<(usize, Target), LoraPair>> {
        if flat.len() != self.len() {
            return Err(ModelError::Internal(format!(
                "{} values for an adapter of {}",
                flat.len(),
                self.len()
            )));
        }
        Ok(self
            .sites
            .iter()
            .map(|(&key, s)| {
                let pair = LoraPair {
                    a: flat[s.a.clone()].to_vec(),
                    b: flat[s.b.clone()].to_vec(),
                };
                (key, pair)
            })
            .collect())
    }

    /// Writes the current factors into `adapter` (same sites and shapes): one read from the device.
    pub fn download_into(&self, adapter: &mut Adapter) -> Result<()> {
        let flat = to_vec(self.values())?;
        for (key, pair) in self.split(&flat)? {
            match adapter.weights.get_mut(&key) {
                Some(slot) if slot.a.len() == pair.a.len() && slot.b.len() == pair.b.len() => {
                    *slot = pair
                }
                _ => {
                    return Err(ModelError::Internal(format!(
                        "the adapter has no site layer {} {} of these shapes",
                        key.0, key.1
                    )))
                }
            }
        }
        Ok(())
    }
}

/// A gradient `[rows, cols]` as `[rows · cols]`.
pub(super) fn flat(x: Tensor<2>) -> Tensor<1> {
    let [rows, cols] = x.dims();
    x.reshape([rows * cols])
}
