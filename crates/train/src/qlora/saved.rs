//! [`StepPath::Saved`](super::StepPath::Saved): every layer's activations kept in forward and the
//! hand-written backward of `backprop.rs`, in Burn tensor ops (any device; no recomputation, no
//! autodiff in the layers).

use burn::tensor::Tensor;
use supportlm_model::error::Result;
use supportlm_model::llama::to_vec;
use supportlm_model::lora::{Adapter, LoraPair};

use super::backprop::{self, Saved};
use super::driver::{LayerGrads, Pass, StepClock};
use super::dropout::{Dropout, TrainLayer};
use super::layout::Layout;
use super::{LossSum, QloraModel};

/// The stored-activation pass over one batch, in tensor ops.
pub(super) struct SavedPass<'a> {
    model: &'a QloraModel,
    adapter: &'a Adapter,
    layout: &'a Layout,
    dropout: Option<Dropout>,
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// `-sin`: RoPE's inverse rotation, which is its backward.
    sin_neg: Tensor<4>,
    /// The additive mask repeated for the grouped query rows.
    grouped_mask: Tensor<4>,
}

impl<'a> SavedPass<'a> {
    pub fn new(
        model: &'a QloraModel,
        adapter: &'a Adapter,
        layout: &'a Layout,
        dropout: Option<Dropout>,
    ) -> Self {
        let c = &model.config;
        let (cos, sin, mask) = layout.tensors(&model.rope, &model.device);
        let sin_neg = sin.clone().neg();
        let grouped_mask = mask.repeat_dim(2, c.num_attention_heads / c.kv_heads());
        SavedPass {
            model,
            adapter,
            layout,
            dropout,
            cos,
            sin,
            sin_neg,
            grouped_mask,
        }
    }

    fn geometry(&self) -> backprop::Geometry<'_> {
        backprop::Geometry {
            b: self.layout.b,
            s: self.layout.s,
            rope: &self.model.rope,
            cos: &self.cos,
            sin: &self.sin,
            sin_neg: &self.sin_neg,
            grouped_mask: &self.grouped_mask,
        }
    }

    /// Layer `l` with the adapter's (untracked) factors and this step's dropout masks.
    fn layer(&self, l: usize) -> TrainLayer {
        let lora = self.model.lora_tensors(self.adapter, l, false);
        let rows = self.layout.b * self.layout.s;
        self.model
            .layer(l, &lora, self.adapter.config.scale(), self.dropout, rows)
    }

    fn hidden(&self) -> usize {
        self.model.config.hidden_size
    }
}

impl Pass for SavedPass<'_> {
    type Hidden = Tensor<2>;
    type Kept = Saved;

    fn embed(&mut self) -> Result<Tensor<2>> {
        let rows = self.layout.b * self.layout.s;
        Ok(self.model.embed(self.layout).reshape([rows, self.hidden()]))
    }

    fn forward(
        &mut self,
        l: usize,
        x: Tensor<2>,
        _clock: &mut StepClock,
    ) -> Result<(Tensor<2>, Saved)> {
        backprop::forward_saving(&self.model.config, &self.layer(l), x, &self.geometry())
    }

    fn head(&mut self, x: Tensor<2>) -> Result<(LossSum, Tensor<2>)> {
        let (b, s, hidden) = (self.layout.b, self.layout.s, self.hidden());
        let (loss, grad) = self
            .model
            .head_loss(x.reshape([b, s, hidden]), self.layout, true)?;
        let grad = match grad {
            Some(g) => g.reshape([b * s, hidden]),
            None => Tensor::zeros([b * s, hidden], &self.model.device),
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
            &self.model.config,
            &self.layer(l),
            kept,
            grad,
            &self.geometry(),
        )?;
        let pairs = pairs
            .into_iter()
            .map(|(t, (da, db))| {
                Ok((
                    t,
                    LoraPair {
                        a: to_vec(da)?,
                        b: to_vec(db)?,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((dx, pairs))
    }
}
