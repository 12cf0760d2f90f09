//! What a run trains (a LoRA adapter or every parameter), its gradients and updates, and how it is
//! written and read back.

use std::path::Path;

use supportlm_model::llama::to_vec;
use supportlm_model::loader::{SafetensorsDir, TensorSource};
use supportlm_model::lora::Adapter;
use supportlm_model::tokenizer::Tokenizer;

use burn::tensor::{Tensor, TensorData};

use crate::config::Tuning;
use crate::error::{Result, TrainError};
use crate::optim::{AdamState, AdamStep, OnDevice};
use crate::qlora::{DeviceFactors, Dropout, LossSum, QloraModel, Sequence};

/// The length of each of the adapter's tensors in site order (A then B of each site).
fn adapter_sizes(adapter: &Adapter) -> Vec<usize> {
    adapter
        .weights
        .values()
        .flat_map(|p| [p.a.len(), p.b.len()])
        .collect()
}

/// The adapter's tensors in site order (A then B of each site), mutable.
fn params_mut(adapter: &mut Adapter) -> Vec<&mut [f32]> {
    adapter
        .weights
        .values_mut()
        .flat_map(|p| [p.a.as_mut_slice(), p.b.as_mut_slice()])
        .collect()
}

/// What a run trains: a LoRA adapter, or every parameter of the model.
pub enum Weights {
    /// A LoRA adapter (the base is frozen).
    Lora(Adapter),
    /// A LoRA adapter trained on a GPU: its factors and AdamW's moments stay on the device between
    /// checkpoints ([`DeviceLora`]).
    DeviceLora(Box<DeviceLora>),
    /// Every parameter; the values live in the model's tensors.
    Full,
    /// Every parameter, trained on a GPU: the values in the model's tensors there, AdamW's moments
    /// beside them ([`DeviceMoments`]).
    DeviceFull(DeviceMoments),
}

/// AdamW's moments of full fine-tuning on the device, one flat tensor per parameter.
pub struct DeviceMoments {
    m: Vec<Tensor<1>>,
    v: Vec<Tensor<1>>,
}

/// Host moments (one vector per tensor) as device tensors, checked against the trained sizes.
fn upload_moments(
    per_tensor: &[Vec<f32>],
    sizes: &[usize],
    model: &QloraModel,
) -> Result<Vec<Tensor<1>>> {
    if per_tensor.len() != sizes.len() || per_tensor.iter().zip(sizes).any(|(m, &n)| m.len() != n) {
        return Err(TrainError::Internal(
            "the optimizer state does not match the trained tensors".into(),
        ));
    }
    Ok(per_tensor
        .iter()
        .map(|m| Tensor::from_data(TensorData::new(m.clone(), [m.len()]), model.device()))
        .collect())
}

/// A LoRA run's state on the device: the factors, and AdamW's moments flat in the same layout.
pub struct DeviceLora {
    /// The adapter as it was uploaded: its configuration and sites (values as of the last upload).
    template: Adapter,
    factors: DeviceFactors,
    m: Tensor<1>,
    v: Tensor<1>,
}

impl DeviceLora {
    /// Uploads `adapter` and its moments in `adam` (one transfer each).
    fn upload(adapter: Adapter, adam: &AdamState, model: &QloraModel) -> Result<Self> {
        let factors = DeviceFactors::upload(&adapter, model.device());
        let sizes = adapter_sizes(&adapter);
        let flat = |per_tensor: &[Vec<f32>]| -> Result<Tensor<1>> {
            let parts = upload_moments(per_tensor, &sizes, model)?;
            Ok(if parts.is_empty() {
                factors.values().zeros_like()
            } else {
                Tensor::cat(parts, 0)
            })
        };
        Ok(DeviceLora {
            m: flat(&adam.m)?,
            v: flat(&adam.v)?,
            template: adapter,
            factors,
        })
    }

    /// The adapter with the device's current factors (one read).
    fn adapter(&self) -> Result<Adapter> {
        let mut a = self.template.clone();
        self.factors.download_into(&mut a)?;
        Ok(a)
    }

    /// Copies the device's moments into `adam`, per tensor in optimizer order (one read).
    fn moments_into(&self, adam: &mut AdamState) -> Result<()> {
        let n = self.factors.len();
        let both = to_vec(Tensor::cat(vec![self.m.clone(), self.v.clone()], 0))?;
        let (m, v) = both.split_at(n);
        for (flat, out) in [(m, &mut adam.m), (v, &mut adam.v)] {
            let pairs = self.factors.split(flat)?;
            *out = pairs.into_values().flat_map(|p| [p.a, p.b]).collect();
        }
        Ok(())
    }

    /// Summed loss of `batch` and the flat gradient, on the device.
    fn loss_and_grads(
        &self,
        model: &QloraModel,
        batch: &[Sequence],
        dropout: Option<Dropout>,
    ) -> Result<(LossSum, Tensor<1>)> {
        Ok(model.device_loss_and_grads(&self.factors, batch, dropout)?)
    }

    /// One AdamW update with the flat gradient `g`, on the device.
    fn update(&mut self, step: AdamStep, g: Tensor<1>) -> Result<()> {
        let state = OnDevice {
            param: self.factors.values(),
            m: self.m.clone(),
            v: self.v.clone(),
        };
        let next = step.apply_on_device(state, g);
        self.factors.set_values(next.param)?;
        (self.m, self.v) = (next.m, next.v);
        Ok(())
    }
}

impl Weights {
    /// The same weights with their values and AdamW's moments (`adam`) moved to the model's device
    /// when that is not the CPU (the CPU keeps its host step).
    pub fn resident(self, model: &QloraModel, adam: &AdamState) -> Result<Self> {
        if supportlm_model::device::is_cpu(model.device()) {
            return Ok(self);
        }
        match self {
            Weights::Lora(a) => Ok(Weights::DeviceLora(Box::new(DeviceLora::upload(
                a, adam, model,
            )?))),
            Weights::Full => {
                let sizes = self.sizes(model);
                Ok(Weights::DeviceFull(DeviceMoments {
                    m: upload_moments(&adam.m, &sizes, model)?,
                    v: upload_moments(&adam.v, &sizes, model)?,
                }))
            }
            w => Ok(w),
        }
    }

    /// Brings `adam`'s moments up to date from the device, before a checkpoint writes them.
    pub fn sync_optimizer(&self, adam: &mut AdamState) -> Result<()> {
        match self {
            Weights::DeviceLora(d) => d.moments_into(adam),
            Weights::DeviceFull(d) => {
                adam.m = d.m.iter().cloned().map(to_vec).collect::<Result<_, _>>()?;
                adam.v = d.v.iter().cloned().map(to_vec).collect::<Result<_, _>>()?;
                Ok(())
            }
            Weights::Lora(_) | Weights::Full => Ok(()),
        }
    }

    /// Whether the values and AdamW's moments live on the device ([`Self::resident`] on a GPU): its
    /// steps go through [`Self::device_loss_and_grads`] and [`Self::update_on_device`].
    pub fn is_on_device(&self) -> bool {
        matches!(self, Weights::DeviceLora(_) | Weights::DeviceFull(_))
    }

    /// Summed loss of one micro-batch and its gradients left on the device, in optimizer order (one
    /// flat tensor for an adapter, one per parameter for full fine-tuning).
    pub fn device_loss_and_grads(
        &self,
        model: &QloraModel,
        batch: &[Sequence],
        dropout: Option<Dropout>,
    ) -> Result<(LossSum, Vec<Tensor<1>>)> {
        match self {
            Weights::DeviceLora(d) => d
                .loss_and_grads(model, batch, dropout)
                .map(|(loss, g)| (loss, vec![g])),
            Weights::DeviceFull(_) => Ok(model.device_full_loss_and_grads(batch)?),
            Weights::Lora(_) | Weights::Full => Err(TrainError::Internal(
                "device gradients asked of weights trained on the host".into(),
            )),
        }
    }

    /// One AdamW update on the device with gradients from [`Self::device_loss_and_grads`].
    pub fn update_on_device(
        &mut self,
        model: &mut QloraModel,
        step: AdamStep,
        grads: Vec<Tensor<1>>,
    ) -> Result<()> {
        match self {
            Weights::DeviceLora(d) => {
                let g = grads
                    .into_iter()
                    .next()
                    .ok_or_else(|| TrainError::Internal("no gradient for the adapter".into()))?;
                d.update(step, g)
            }
            Weights::DeviceFull(d) => {
                for (i, g) in grads.into_iter().enumerate() {
                    let state = OnDevice {
                        param: model.full_parameter_tensor(i)?,
                        m: d.m[i].clone(),
                        v: d.v[i].clone(),
                    };
                    let next = step.apply_on_device(state, g);
                    model.set_full_parameter_tensor(i, next.param)?;
                    (d.m[i], d.v[i]) = (next.m, next.v);
                }
                Ok(())
            }
            Weights::Lora(_) | Weights::Full => Err(TrainError::Internal(
                "a device update asked of weights trained on the host".into(),
            )),
        }
    }

    /// Waits for the device's queued work on these weights (an update) to finish, reading one value
    /// back: what a benchmark calls before it stops its clock.
    pub fn wait_for_device(&self, model: &QloraModel) -> Result<()> {
        let last = match self {
            Weights::DeviceLora(d) => d.factors.values(),
            Weights::DeviceFull(_) => model.full_parameter_tensor(self.sizes(model).len() - 1)?,
            Weights::Lora(_) | Weights::Full => return Ok(()),
        };
        to_vec(last.narrow(0, 0, 1))?;
        Ok(())
    }

    /// The folder name of these weights inside a run or checkpoint folder.
    pub(super) fn folder(&self) -> &'static str {
        match self {
            Weights::Lora(_) | Weights::DeviceLora(_) => "adapter",
            Weights::Full | Weights::DeviceFull(_) => "model",
        }
    }

    /// The length of every trained tensor, in optimizer order.
    pub fn sizes(&self, model: &QloraModel) -> Vec<usize> {
        match self {
            Weights::Lora(a) => adapter_sizes(a),
            Weights::DeviceLora(d) => adapter_sizes(&d.template),
            Weights::Full | Weights::DeviceFull(_) => model.full_sizes(),
        }
    }

    /// Summed loss and gradients (in optimizer order) of one micro-batch, on the host.
    pub fn loss_and_grads(
        &self,
        model: &QloraModel,
        batch: &[Sequence],
        dropout: Option<Dropout>,
    ) -> Result<(LossSum, Vec<Vec<f32>>)> {
        Ok(match self {
            Weights::Lora(a) => {
                let out = model.loss_and_grads(a, batch, dropout)?;
                let flat = out.grads.into_values().flat_map(|p| [p.a, p.b]).collect();
                (out.loss, flat)
            }
            Weights::Full => {
                let out = model.full_loss_and_grads(batch)?;
                (out.loss, out.grads)
            }
            Weights::DeviceLora(_) | Weights::DeviceFull(_) => {
                return Err(TrainError::Internal(
                    "host gradients asked of weights trained on the device".into(),
                ))
            }
        })
    }

    /// Applies one AdamW update (full fine-tuning: one tensor at a time, out of the model and back).
    pub fn update(
        &mut self,
        model: &mut QloraModel,
        step: AdamStep,
        adam: &mut AdamState,
        grads: &[Vec<f32>],
    ) -> Result<()> {
        match self {
            Weights::Lora(a) => {
                for (i, (p, g)) in params_mut(a).into_iter().zip(grads).enumerate() {
                    step.apply(&mut adam.m[i], &mut adam.v[i], p, g);
                }
            }
            Weights::Full => {
                for (i, g) in grads.iter().enumerate() {
                    let mut p = model.full_parameter(i)?;
                    step.apply(&mut adam.m[i], &mut adam.v[i], &mut p, g);
                    model.set_full_parameter(i, p)?;
                }
            }
            Weights::DeviceLora(_) | Weights::DeviceFull(_) => {
                return Err(TrainError::Internal(
                    "a host update asked of weights trained on the device".into(),
                ))
            }
        }
        Ok(())
    }

    /// Writes the weights as `dir` (PEFT adapter folder, or Hugging Face model folder).
    pub(super) fn write(
        &self,
        dir: &Path,
        model: &QloraModel,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        match self {
            Weights::Lora(a) => a.save(dir, &model.config)?,
            Weights::DeviceLora(d) => d.adapter()?.save(dir, &model.config)?,
            Weights::Full | Weights::DeviceFull(_) => model.save_full_hf_dir(dir, tokenizer)?,
        }
        Ok(())
    }

    /// Reads the weights a checkpoint folder holds (full: into the model's tensors).
    pub(super) fn read(tuning: Tuning, checkpoint: &Path, model: &mut QloraModel) -> Result<Self> {
        match tuning {
            Tuning::Lora => Ok(Weights::Lora(Adapter::load(
                &checkpoint.join("adapter"),
                &model.config,
            )?)),
            Tuning::Full => {
                let dir = checkpoint.join("model");
                let path = dir.join("model.safetensors");
                let file = SafetensorsDir::open_files(&dir, vec![path.clone()])?;
                for (i, p) in model.full_parameters().into_iter().enumerate() {
                    let (values, shape) =
                        file.tensor(&p.name)?
                            .ok_or_else(|| TrainError::Checkpoint {
                                path: path.clone(),
                                message: format!("{} is missing", p.name),
                            })?;
                    if shape != p.shape {
                        return Err(TrainError::Checkpoint {
                            path,
                            message: format!(
                                "{} has shape {shape:?}, expected {:?}",
                                p.name, p.shape
                            ),
                        });
                    }
                    model.set_full_parameter(i, values)?;
                }
                Ok(Weights::Full)
            }
        }
    }

    /// Trainable parameters.
    pub fn num_params(&self, model: &QloraModel) -> usize {
        self.sizes(model).iter().sum()
    }
}

/// Mean loss per target token over `seqs` with `weights`, in batches.
pub fn validation_loss(
    model: &QloraModel,
    weights: &Weights,
    seqs: &[Sequence],
    batch: usize,
) -> Result<f64> {
    let uploaded;
    let factors = match weights {
        Weights::Lora(a) => {
            a.validate_for(&model.config)?;
            uploaded = DeviceFactors::upload(a, model.device());
            Some(&uploaded)
        }
        Weights::DeviceLora(d) => Some(&d.factors),
        Weights::Full | Weights::DeviceFull(_) => None,
    };
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].ids.len());
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in order.chunks(batch.max(1)) {
        let b: Vec<Sequence> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let l = model.device_loss(factors, &b)?;
        supportlm_fsio::chaos::point("validation: a batch's loss computed");
        sum += l.sum;
        tokens += l.tokens;
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Writes the weights as folder `dir`: into `dir.tmp`, then the old folder is moved aside to
/// `dir.old.tmp`, the new one renamed into place and the old one removed. A crash leaves `dir` complete
/// (old or new) or, between the two renames, missing with both `*.tmp` folders beside it; the trainer
/// writes a weights folder before the checkpoint that records it, so a resumed run rewrites it.
pub(super) fn save_weights_dir(
    dir: &Path,
    weights: &Weights,
    model: &QloraModel,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old.tmp");
    for leftover in [&tmp, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).map_err(|e| TrainError::io(leftover, e))?;
        }
    }
    weights.write(&tmp, model, tokenizer)?;
    supportlm_fsio::chaos::point("weights folder: written beside the old one");
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
        supportlm_fsio::chaos::point("weights folder: old one moved aside");
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}
