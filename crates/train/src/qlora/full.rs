//! Full fine-tuning: every parameter of an f32 base trainable (embeddings, norms, projections, biases,
//! LM head), for the efficiency comparison with LoRA and QLoRA.
//!
//! It reuses the LoRA path's memory design: a forward pass keeping only layer inputs, then one layer at
//! a time recomputed on the autodiff device with its weights tracked. The parameters live in the
//! model's tensors; [`QloraModel::full_parameter`] / [`QloraModel::set_full_parameter`] move them in
//! and out for the optimizer, one tensor at a time.

use std::path::Path;

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::{LossSum, QloraModel, Sequence, Table};
use supportlm_model::error::{ModelError, Result};
use supportlm_model::export::write_hf_dir;
use supportlm_model::llama::{to_vec, Attention, DecoderLayer, Linear, Mlp, RmsNorm};
use supportlm_model::lora::Target;
use supportlm_model::names;
use supportlm_model::tokenizer::Tokenizer;
use supportlm_model::weight::BaseWeight;
use supportlm_quant::BaseQuant;

/// One trainable tensor of full fine-tuning: its Hugging Face name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// The Hugging Face tensor name.
    pub name: String,
    /// Its shape (PyTorch order).
    pub shape: Vec<usize>,
}

/// The summed loss of a batch and the gradient of every parameter, in [`QloraModel::full_parameters`]
/// order.
#[derive(Debug, Clone)]
pub struct FullStep {
    /// The batch's summed loss.
    pub loss: LossSum,
    /// One gradient per parameter, in [`QloraModel::full_parameters`] order.
    pub grads: Vec<Vec<f32>>,
}

/// Where a parameter lives in the model.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Embed,
    LmHead,
    Norm,
    InputNorm(usize),
    PostNorm(usize),
    Weight(usize, usize),
    Bias(usize, usize),
}

/// A layer's tracked parameter tensors, in slot order.
enum Tracked {
    Vector(Tensor<1>),
    Matrix(Tensor<2>),
}

impl Tracked {
    /// The parameter's gradient, flat, on the device.
    fn grad(&self, g: &burn::tensor::Gradients) -> Result<Tensor<1>> {
        let missing = || ModelError::Internal("a parameter received no gradient".into());
        match self {
            Tracked::Vector(t) => t.grad(g).ok_or_else(missing),
            Tracked::Matrix(t) => t.grad(g).map(super::factors::flat).ok_or_else(missing),
        }
    }
}

/// A step's full fine-tuning gradients on the device, before the embedding rows are summed.
struct DeviceGrads {
    loss: LossSum,
    /// Per slot (the embedding's left `None`); `None` also for a parameter no target reached.
    params: Vec<Option<Tensor<1>>>,
    /// The gradient at every position's embedding, `[b·s, hidden]`, and the positions' token ids.
    embedded: Option<(Tensor<2>, Vec<i64>)>,
    /// The LM head table's gradient (tied: added to the embedding's).
    dhead: Option<Tensor<2>>,
}

fn track1(t: &Tensor<1>) -> Tensor<1> {
    t.clone().autodiff().require_grad()
}

fn track2(t: &Tensor<2>) -> Tensor<2> {
    t.clone().autodiff().require_grad()
}

impl QloraModel {
    fn require_full(&self) -> Result<()> {
        if self.quant != BaseQuant::None {
            return Err(ModelError::Input(format!(
                "full fine-tuning trains every weight and needs an f32 base (base_quant none), not {}",
                self.quant
            )));
        }
        Ok(())
    }

    /// Every parameter slot with its Hugging Face name, in a fixed order.
    fn slots(&self) -> Vec<(String, Slot)> {
        let mut out = vec![(names::EMBED_TOKENS.to_string(), Slot::Embed)];
        for (l, layer) in self.layers.iter().enumerate() {
            let ln = names::layer(l);
            out.push((ln.input_norm(), Slot::InputNorm(l)));
            for (k, &t) in Target::ALL.iter().enumerate() {
                out.push((ln.proj(t).weight(), Slot::Weight(l, k)));
                if layer.linears[k].bias.is_some() {
                    out.push((ln.proj(t).bias(), Slot::Bias(l, k)));
                }
            }
            out.push((ln.post_attention_norm(), Slot::PostNorm(l)));
        }
        out.push((names::FINAL_NORM.to_string(), Slot::Norm));
        if self.lm_head.is_some() {
            out.push((names::LM_HEAD.to_string(), Slot::LmHead));
        }
        out
    }

    /// The trainable tensors of full fine-tuning, in the order of [`FullStep::grads`].
    pub fn full_parameters(&self) -> Vec<ParamInfo> {
        let hidden = self.config.hidden_size;
        self.slots()
            .into_iter()
            .map(|(name, slot)| {
                let shape = match slot {
                    Slot::Embed | Slot::LmHead => vec![self.config.vocab_size, hidden],
                    Slot::Norm | Slot::InputNorm(_) | Slot::PostNorm(_) => vec![hidden],
                    Slot::Weight(_, k) => Target::ALL[k].shape(&self.config).to_vec(),
                    Slot::Bias(_, k) => vec![Target::ALL[k].shape(&self.config)[0]],
                };
                ParamInfo { name, shape }
            })
            .collect()
    }

    fn slot(&self, index: usize) -> Result<Slot> {
        self.slots()
            .get(index)
            .map(|(_, s)| *s)
            .ok_or_else(|| ModelError::Internal(format!("no parameter number {index}")))
    }

    /// The values of parameter `index` (row-major).
    pub fn full_parameter(&self, index: usize) -> Result<Vec<f32>> {
        to_vec(self.full_parameter_tensor(index)?)
    }

    /// Parameter `index`, flat, on the model's device.
    pub fn full_parameter_tensor(&self, index: usize) -> Result<Tensor<1>> {
        self.require_full()?;
        let table = |t: &Table| match t {
            Table::F32(t) => Ok(super::factors::flat(t.clone())),
            Table::Bf16 { .. } => Err(ModelError::Internal("a bf16 table is frozen".into())),
        };
        match self.slot(index)? {
            Slot::Embed => table(&self.embed_tokens),
            Slot::LmHead => self.lm_head.as_ref().map_or_else(
                || Err(ModelError::Internal("the LM head is tied".into())),
                table,
            ),
            Slot::Norm => Ok(self.norm.clone()),
            Slot::InputNorm(l) => Ok(self.layers[l].input_layernorm.clone()),
            Slot::PostNorm(l) => Ok(self.layers[l].post_attention_layernorm.clone()),
            Slot::Weight(l, k) => match &self.layers[l].linears[k].weight {
                BaseWeight::F32(t) => Ok(super::factors::flat(t.clone())),
                _ => Err(ModelError::Internal("a quantized weight is frozen".into())),
            },
            Slot::Bias(l, k) => self.layers[l].linears[k]
                .bias
                .clone()
                .ok_or_else(|| ModelError::Internal("no bias".into())),
        }
    }

    /// Replaces the values of parameter `index` (same length as before).
    pub fn set_full_parameter(&mut self, index: usize, values: Vec<f32>) -> Result<()> {
        let n = values.len();
        let t = Tensor::<1>::from_data(TensorData::new(values, [n]), &self.device);
        self.set_full_parameter_tensor(index, t)
    }

    /// Replaces parameter `index` with `values`, flat, on the model's device (same length as before).
    pub fn set_full_parameter_tensor(&mut self, index: usize, values: Tensor<1>) -> Result<()> {
        self.require_full()?;
        let info = self
            .full_parameters()
            .into_iter()
            .nth(index)
            .ok_or_else(|| ModelError::Internal(format!("no parameter number {index}")))?;
        let n = values.dims()[0];
        if n != info.shape.iter().product::<usize>() {
            return Err(ModelError::ShapeMismatch {
                tensor: info.name,
                expected: info.shape,
                found: vec![n],
            });
        }
        let t2 = |v: Tensor<1>| v.reshape([info.shape[0], info.shape[1]]);
        match self.slot(index)? {
            Slot::Embed => self.embed_tokens = Table::F32(t2(values)),
            Slot::LmHead => self.lm_head = Some(Table::F32(t2(values))),
            Slot::Norm => self.norm = values,
            Slot::InputNorm(l) => self.layers[l].input_layernorm = values,
            Slot::PostNorm(l) => self.layers[l].post_attention_layernorm = values,
            Slot::Weight(l, k) => self.layers[l].linears[k].weight = BaseWeight::F32(t2(values)),
            Slot::Bias(l, k) => self.layers[l].linears[k].bias = Some(values),
        }
        Ok(())
    }

    /// Writes the current parameters as a Hugging Face folder (`config.json`, `model.safetensors`,
    /// tokenizer files) that [`crate::Model::load`] reads back.
    pub fn save_full_hf_dir(&self, dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
        let weights = self
            .full_parameters()
            .into_iter()
            .enumerate()
            .map(|(i, p)| Ok((p.name, p.shape, self.full_parameter(i)?)))
            .collect::<Result<Vec<_>>>()?;
        write_hf_dir(dir, &self.config, tokenizer, &weights)
    }

    /// Layer `index` with every parameter tracked, and those parameters in slot order.
    fn tracked_layer(&self, index: usize) -> Result<(DecoderLayer, Vec<Tracked>)> {
        let frozen = &self.layers[index];
        let mut params = Vec::new();
        let input_norm = track1(&frozen.input_layernorm);
        params.push(Tracked::Vector(input_norm.clone()));
        let mut linears = Vec::with_capacity(7);
        for f in &frozen.linears {
            let BaseWeight::F32(w) = &f.weight else {
                return Err(ModelError::Internal("a quantized weight is frozen".into()));
            };
            let w = track2(w);
            params.push(Tracked::Matrix(w.clone()));
            let bias = f.bias.as_ref().map(track1);
            if let Some(b) = &bias {
                params.push(Tracked::Vector(b.clone()));
            }
            linears.push(Linear::new(w, bias));
        }
        let post_norm = track1(&frozen.post_attention_layernorm);
        params.push(Tracked::Vector(post_norm.clone()));
        let mut it = linears.into_iter();
        let mut next = || {
            it.next()
                .unwrap_or_else(|| unreachable!("seven projections"))
        };
        let eps = self.config.rms_norm_eps;
        let layer = DecoderLayer {
            input_layernorm: RmsNorm {
                weight: input_norm,
                eps,
            },
            self_attn: Attention {
                q_proj: next(),
                k_proj: next(),
                v_proj: next(),
                o_proj: next(),
            },
            post_attention_layernorm: RmsNorm {
                weight: post_norm,
                eps,
            },
            mlp: Mlp {
                gate_proj: next(),
                up_proj: next(),
                down_proj: next(),
            },
        };
        Ok((layer, params))
    }

    /// Summed loss of `batch` and the gradient of every parameter (full fine-tuning), on the host.
    pub fn full_loss_and_grads(&self, batch: &[Sequence]) -> Result<FullStep> {
        let step = self.full_backward(batch)?;
        let hidden = self.config.hidden_size;
        let sizes = self.full_sizes();
        let mut grads = step
            .params
            .into_iter()
            .map(|g| g.map(to_vec).transpose().map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>>>()?;
        let dhead = step.dhead.map(to_vec).transpose()?.unwrap_or_default();
        // Embedding rows: the gradient at each position's input added to its token's row.
        let mut dembed = vec![0f32; sizes[0]];
        if let Some((dx0, ids)) = step.embedded {
            let dx0 = to_vec(dx0)?;
            for (i, &id) in ids.iter().enumerate() {
                let src = &dx0[i * hidden..(i + 1) * hidden];
                let dst = &mut dembed[id as usize * hidden..(id as usize + 1) * hidden];
                dst.iter_mut().zip(src).for_each(|(d, g)| *d += g);
            }
        }
        let last = grads.len() - 1;
        match self.lm_head {
            Some(_) => grads[last] = dhead,
            None if !dhead.is_empty() => dembed.iter_mut().zip(&dhead).for_each(|(d, h)| *d += h),
            None => {}
        }
        grads[0] = dembed;
        for (g, (&n, info)) in grads
            .iter_mut()
            .zip(sizes.iter().zip(self.full_parameters()))
        {
            if g.is_empty() {
                *g = vec![0.0; n];
            } else if g.len() != n {
                return Err(ModelError::ShapeMismatch {
                    tensor: info.name,
                    expected: info.shape,
                    found: vec![g.len()],
                });
            }
        }
        Ok(FullStep {
            loss: step.loss,
            grads,
        })
    }

    /// [`Self::full_loss_and_grads`] with every gradient left on the device, flat, in
    /// [`Self::full_parameters`] order: the step of a full fine-tuning run on a GPU.
    pub fn device_full_loss_and_grads(
        &self,
        batch: &[Sequence],
    ) -> Result<(LossSum, Vec<Tensor<1>>)> {
        let step = self.full_backward(batch)?;
        let [vocab, hidden] = [self.config.vocab_size, self.config.hidden_size];
        let mut dembed = Tensor::<2>::zeros([vocab, hidden], &self.device);
        if let Some((dx0, ids)) = step.embedded {
            let n = ids.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &self.device);
            dembed = dembed.select_assign(0, idx, dx0, IndexingUpdateOp::Add);
        }
        let mut grads = step.params;
        let last = grads.len() - 1;
        match (self.lm_head.is_some(), step.dhead) {
            (true, dhead) => grads[last] = dhead.map(super::factors::flat),
            (false, Some(dhead)) => dembed = dembed + dhead,
            (false, None) => {}
        }
        grads[0] = Some(super::factors::flat(dembed));
        let grads = grads
            .into_iter()
            .zip(self.full_sizes())
            .map(|(g, n)| g.unwrap_or_else(|| Tensor::zeros([n], &self.device)))
            .collect();
        Ok((step.loss, grads))
    }

    /// Values in each parameter, in [`Self::full_parameters`] order.
    pub fn full_sizes(&self) -> Vec<usize> {
        self.full_parameters()
            .iter()
            .map(|p| p.shape.iter().product())
            .collect()
    }

    /// Forward keeping layer inputs, the head, then each layer recomputed with its parameters tracked.
    fn full_backward(&self, batch: &[Sequence]) -> Result<DeviceGrads> {
        self.require_full()?;
        let layout = self.check_batch(batch)?;
        let (b, s) = (layout.b, layout.s);
        let hidden = self.config.hidden_size;
        let (cos, sin, mask) = layout.tensors(&self.rope, &self.device);
        let (x, mut xs) = self.forward_layers(&layout, None, (&cos, &sin, &mask), true);
        let head = self.head(x, &layout, true, true)?;
        let n_params = self.slots().len();
        let mut params: Vec<Option<Tensor<1>>> = vec![None; n_params];
        let Some(mut grad) = head.dx else {
            // No target positions: every gradient is zero.
            return Ok(DeviceGrads {
                loss: head.loss,
                params,
                embedded: None,
                dhead: None,
            });
        };
        // The last slots: final norm, then the untied head.
        let norm_slot = n_params - 1 - usize::from(self.lm_head.is_some());
        params[norm_slot] = head.dnorm;

        // Layers in reverse; a layer's slots start after the embedding and the earlier layers' slots.
        let per_layer: Vec<usize> = self
            .layers
            .iter()
            .map(|l| 2 + 7 + l.linears.iter().filter(|f| f.bias.is_some()).count())
            .collect();
        for l in (0..self.layers.len()).rev() {
            let x_in = xs
                .pop()
                .unwrap_or_else(|| Tensor::zeros([b, s, hidden], &self.device));
            let (layer, tracked) = self.tracked_layer(l)?;
            let (g, dx) = self.backward_through(&layer, x_in, grad, (&cos, &sin, &mask))?;
            let first = 1 + per_layer[..l].iter().sum::<usize>();
            for (k, p) in tracked.iter().enumerate() {
                params[first + k] = Some(p.grad(&g)?);
            }
            grad = dx;
        }
        Ok(DeviceGrads {
            loss: head.loss,
            params,
            embedded: Some((grad.reshape([b * s, hidden]), layout.ids.clone())),
            dhead: head.dhead,
        })
    }
}
