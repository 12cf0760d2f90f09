//! [`StepPath::Saved`](super::StepPath::Saved): every layer's activations kept in forward and the
//! hand-written backward of `backprop.rs`, in Burn tensor ops (any device; no recomputation, no
//! autodiff in the layers). The adapter gradients stay on the device.

use burn::tensor::Tensor;
use supportlm_model::error::Result;

use super::backprop::{self, Saved};
use super::driver::{LayerGrads, Pass, StepClock, StepInputs};
use super::dropout::TrainLayer;
use super::factors::{flat, DeviceFactors};
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
    factors: &'a DeviceFactors,
}

impl<'a> SavedPass<'a> {
    pub fn new(step: StepInputs<'a>, factors: &'a DeviceFactors) -> Self {
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
            factors,
        }
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
        self.step.layer(self.factors, l, false).1
    }

    fn hidden(&self) -> usize {
        self.step.model.config.hidden_size
    }
}

impl Pass for SavedPass<'_> {
    type Hidden = Tensor<2>;
    type Kept = Saved;
    type PairGrad = (Tensor<1>, Tensor<1>);

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
    ) -> Result<(Tensor<2>, LayerGrads<Self::PairGrad>)> {
        let (dx, pairs) = backprop::backward(
            &self.step.model.config,
            &self.layer(l),
            kept,
            grad,
            &self.geometry(),
        )?;
        let pairs = pairs
            .into_iter()
            .map(|(t, (da, db))| (t, (flat(da), flat(db))))
            .collect();
        Ok((dx, pairs))
    }
}
