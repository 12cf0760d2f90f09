//! [`StepPath::Saved`](super::StepPath::Saved): every layer's activations kept in forward and the
//! hand-written backward of `backprop.rs`, in Burn tensor ops (any device; no recomputation, no
//! autodiff in the layers). The adapter gradients stay on the device until the step ends, then come
//! back in one read ([`SavedPass::finish`]), not one per layer.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use supportlm_model::error::{ModelError, Result};
use supportlm_model::llama::to_vec;
use supportlm_model::lora::LoraPair;
use supportlm_model::lora::Target;

use super::backprop::{self, Saved};
use super::driver::{LayerGrads, Pass, StepClock, StepInputs};
use super::dropout::TrainLayer;
use super::LossSum;

/// The stored-activation pass over one batch, in tensor ops.
pub(super) struct SavedPass<'a> {
    step: StepInputs<'a>,
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// `-sin`: RoPE's inverse rotation, which is its backward.
    sin_neg: Tensor<4>,
    /// The additive mask repeated for the grouped query rows.
    grouped_mask: Tensor<4>,
    /// Each adapted projection's `(dA, dB)`, flattened, on the device until [`SavedPass::finish`].
    pending: Vec<((usize, Target), Tensor<1>, Tensor<1>)>,
}

impl<'a> SavedPass<'a> {
    pub fn new(step: StepInputs<'a>) -> Self {
        let (model, layout) = (step.model, step.layout);
        let c = &model.config;
        let (cos, sin, mask) = layout.tensors(&model.rope, &model.device);
        let sin_neg = sin.clone().neg();
        let grouped_mask = mask.repeat_dim(2, c.num_attention_heads / c.kv_heads());
        SavedPass {
            step,
            cos,
            sin,
            sin_neg,
            grouped_mask,
            pending: Vec::new(),
        }
    }

    /// The adapter gradients of the step, read back from the device at once.
    pub fn finish(self) -> Result<BTreeMap<(usize, Target), LoraPair>> {
        if self.pending.is_empty() {
            return Ok(BTreeMap::new());
        }
        let sizes: Vec<(usize, usize)> = self
            .pending
            .iter()
            .map(|(_, a, b)| (a.dims()[0], b.dims()[0]))
            .collect();
        let mut parts = Vec::with_capacity(2 * self.pending.len());
        let mut keys = Vec::with_capacity(self.pending.len());
        for (key, a, b) in self.pending {
            keys.push(key);
            parts.extend([a, b]);
        }
        let values = to_vec(Tensor::cat(parts, 0))?;
        let mut rest = values.as_slice();
        let mut grads = BTreeMap::new();
        for (key, (na, nb)) in keys.into_iter().zip(sizes) {
            if rest.len() < na + nb {
                return Err(ModelError::Internal(
                    "the adapter gradients read back are short".into(),
                ));
            }
            let (a, tail) = rest.split_at(na);
            let (b, tail) = tail.split_at(nb);
            rest = tail;
            grads.insert(
                key,
                LoraPair {
                    a: a.to_vec(),
                    b: b.to_vec(),
                },
            );
        }
        Ok(grads)
    }

    fn geometry(&self) -> backprop::Geometry<'_> {
        backprop::Geometry {
            b: self.step.layout.b,
            s: self.step.layout.s,
            rope: &self.step.model.rope,
            cos: &self.cos,
            sin: &self.sin,
            sin_neg: &self.sin_neg,
            grouped_mask: &self.grouped_mask,
        }
    }

    /// Layer `l` with the adapter's (untracked) factors and this step's dropout masks.
    fn layer(&self, l: usize) -> TrainLayer {
        self.step.layer(l, false).1
    }

    fn hidden(&self) -> usize {
        self.step.model.config.hidden_size
    }
}

impl Pass for SavedPass<'_> {
    type Hidden = Tensor<2>;
    type Kept = Saved;

    fn embed(&mut self) -> Result<Tensor<2>> {
        let (model, layout) = (self.step.model, self.step.layout);
        Ok(model
            .embed(layout)
            .reshape([layout.b * layout.s, self.hidden()]))
    }

    fn forward(
        &mut self,
        l: usize,
        x: Tensor<2>,
        _clock: &mut StepClock,
    ) -> Result<(Tensor<2>, Saved)> {
        backprop::forward_saving(&self.step.model.config, &self.layer(l), x, &self.geometry())
    }

    fn head(&mut self, x: Tensor<2>) -> Result<(LossSum, Tensor<2>)> {
        let (model, layout) = (self.step.model, self.step.layout);
        let (b, s, hidden) = (layout.b, layout.s, self.hidden());
        let (loss, grad) = model.head_loss(x.reshape([b, s, hidden]), layout, true)?;
        let grad = match grad {
            Some(g) => g.reshape([b * s, hidden]),
            None => Tensor::zeros([b * s, hidden], &model.device),
        };
        Ok((loss, grad))
    }

    fn backward(
        &mut self,
        l: usize,
        kept: Saved,
        grad: Tensor<2>,
        _clock: &mut StepClock,
    ) -> Result<(Tensor<2>, LayerGrads)> {
        let (dx, pairs) = backprop::backward(
            &self.step.model.config,
            &self.layer(l),
            kept,
            grad,
            &self.geometry(),
        )?;
        for (t, (da, db)) in pairs {
            let (na, nb): (usize, usize) = (da.dims().iter().product(), db.dims().iter().product());
            self.pending
                .push(((l, t), da.reshape([na]), db.reshape([nb])));
        }
        Ok((dx, Vec::new()))
    }
}
