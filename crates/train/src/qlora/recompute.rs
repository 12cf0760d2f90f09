//! [`StepPath::Recompute`](super::StepPath::Recompute): forward keeps each layer's input only;
//! backward re-runs the layer on Burn's autodiff device and takes the adapter's gradients from it.

use burn::tensor::Tensor;
use supportlm_model::error::{ModelError, Result};

use super::driver::{LayerGrads, Pass, StepClock, StepInputs};
use super::factors::{flat, DeviceFactors};
use super::LossSum;

/// The recomputing pass over one batch.
pub(super) struct RecomputePass<'a> {
    step: StepInputs<'a>,
    /// RoPE cos, sin and the additive mask of the batch.
    tables: (Tensor<4>, Tensor<4>, Tensor<4>),
    factors: &'a DeviceFactors,
}

impl<'a> RecomputePass<'a> {
    pub fn new(step: StepInputs<'a>, factors: &'a DeviceFactors) -> Self {
        let tables = step.layout.tensors(&step.model.rope, &step.model.device);
        RecomputePass {
            step,
            tables,
            factors,
        }
    }
}

impl Pass for RecomputePass<'_> {
    type Hidden = Tensor<3>;
    type Kept = Tensor<3>;
    type PairGrad = (Tensor<1>, Tensor<1>);

    fn embed(&mut self) -> Result<Tensor<3>> {
        Ok(self.step.model.embed(self.step.layout))
    }

    fn forward(
        &mut self,
        l: usize,
        x: Tensor<3>,
        _clock: &mut StepClock,
    ) -> Result<(Tensor<3>, Tensor<3>)> {
        let m = self.step.model;
        let (_, layer) = self.step.layer(self.factors, l, false);
        let (cos, sin, mask) = &self.tables;
        let next = m.run_layer(&layer.base, x.clone(), (cos, sin, mask));
        Ok((next, x))
    }

    fn head(&mut self, x: Tensor<3>) -> Result<(LossSum, Tensor<3>)> {
        let (m, layout) = (self.step.model, self.step.layout);
        let (loss, grad) = m.head_loss(x, layout, true)?;
        let shape = [layout.b, layout.s, m.config.hidden_size];
        let grad = grad.unwrap_or_else(|| Tensor::zeros(shape, &m.device));
        Ok((loss, grad))
    }

    fn backward(
        &mut self,
        l: usize,
        x_in: Tensor<3>,
        grad: Tensor<3>,
        _clock: &mut StepClock,
    ) -> Result<(Tensor<3>, LayerGrads<Self::PairGrad>)> {
        let m = self.step.model;
        let (lora, layer) = self.step.layer(self.factors, l, true);
        let (cos, sin, mask) = &self.tables;
        let (g, dx) = m.backward_through(&layer.base, x_in, grad, (cos, sin, mask))?;
        let mut pairs = Vec::with_capacity(lora.len());
        for (t, (a, bt)) in &lora {
            match (a.grad(&g), bt.grad(&g)) {
                (Some(ga), Some(gb)) => pairs.push((*t, (flat(ga), flat(gb)))),
                _ => {
                    return Err(ModelError::Internal(format!(
                        "LoRA factors of layer {l} {t} received no gradient"
                    )))
                }
            }
        }
        Ok((dx, pairs))
    }
}
