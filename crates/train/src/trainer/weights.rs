//! What a run trains (a LoRA adapter or every parameter), its gradients and updates, and how it is
//! written and read back.

use std::path::Path;

use supportlm_model::loader::{SafetensorsDir, TensorSource};
use supportlm_model::lora::Adapter;
use supportlm_model::tokenizer::Tokenizer;

use crate::config::Tuning;
use crate::error::{Result, TrainError};
use crate::optim::{AdamState, AdamStep};
use crate::qlora::{Dropout, LossSum, QloraModel, Sequence};

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
    /// Every parameter; the values live in the model's tensors.
    Full,
}

impl Weights {
    /// The adapter, when LoRA.
    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Weights::Lora(a) => Some(a),
            Weights::Full => None,
        }
    }

    /// The folder name of these weights inside a run or checkpoint folder.
    pub(super) fn folder(&self) -> &'static str {
        match self {
            Weights::Lora(_) => "adapter",
            Weights::Full => "model",
        }
    }

    /// The length of every trained tensor, in optimizer order.
    pub fn sizes(&self, model: &QloraModel) -> Vec<usize> {
        match self {
            Weights::Lora(a) => a
                .weights
                .values()
                .flat_map(|p| [p.a.len(), p.b.len()])
                .collect(),
            Weights::Full => model
                .full_parameters()
                .iter()
                .map(|p| p.shape.iter().product())
                .collect(),
        }
    }

    /// Summed loss and gradients (in optimizer order) of one micro-batch.
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
            Weights::Full => model.save_full_hf_dir(dir, tokenizer)?,
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

/// Mean loss per target token over `seqs`, in batches.
pub fn validation_loss(
    model: &QloraModel,
    adapter: Option<&Adapter>,
    seqs: &[Sequence],
    batch: usize,
) -> Result<f64> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].ids.len());
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in order.chunks(batch.max(1)) {
        let b: Vec<Sequence> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let l = model.loss(adapter, &b)?;
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
