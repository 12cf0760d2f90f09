//! One optimizer step: the micro-batches of the step (gradient accumulation), the mean per-token
//! gradient, global-norm clipping, the learning rate of the schedule and the AdamW update.

use crate::batching::epoch_batches;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::optim::{clip_global_norm, clip_global_norm_on_device, lr_at, AdamState, AdamW};
use crate::qlora::{splitmix, Dropout, LossSum, QloraModel, Sequence};
use supportlm_model::llama::to_vec;

use super::data::Schedule;
use super::weights::Weights;

/// The micro-batches of a run: micro-batch `g` is batch `g mod n` of epoch `g / n`, each epoch's
/// batches drawn from the seed (one epoch's kept at a time).
pub(super) struct Batches<'a> {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    n_batches: usize,
    cached: Option<(usize, Vec<Vec<usize>>)>,
    sequences: &'a [Sequence],
}

impl<'a> Batches<'a> {
    pub fn new(sequences: &'a [Sequence], c: &TrainConfig, n_batches: usize) -> Self {
        Batches {
            lengths: sequences.iter().map(|s| s.ids.len()).collect(),
            batch_size: c.batch_size,
            seed: c.seed,
            n_batches,
            cached: None,
            sequences,
        }
    }

    /// The sequences of micro-batch `g`.
    fn micro_batch(&mut self, g: usize) -> Result<Vec<Sequence>> {
        let (epoch, within) = (g / self.n_batches, g % self.n_batches);
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let batches = epoch_batches(&self.lengths, self.batch_size, self.seed, epoch);
            self.cached = Some((epoch, batches));
        }
        let indices = self
            .cached
            .as_ref()
            .and_then(|(_, b)| b.get(within))
            .ok_or_else(|| TrainError::Internal(format!("micro-batch {g} is not in its epoch")))?;
        Ok(indices.iter().map(|&i| self.sequences[i].clone()).collect())
    }
}

/// What one optimizer step did.
pub(super) struct StepStats {
    /// Mean loss per target token over the step's micro-batches.
    pub loss: f64,
    /// Tokens in the step's micro-batches (prompts included).
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
}

/// The summed gradients of one step's micro-batches, with their loss and token counts.
struct Accumulated<G> {
    grads: Option<G>,
    loss_sum: f64,
    loss_tokens: usize,
    step_tokens: usize,
}

/// Runs the micro-batches of optimizer step `step` through `grads_of` (each with its dropout seed) and
/// sums their gradients with `add`.
fn accumulate<G>(
    c: &TrainConfig,
    step: usize,
    batches: &mut Batches,
    mut grads_of: impl FnMut(&[Sequence], Option<Dropout>) -> Result<(LossSum, G)>,
    add: impl Fn(G, G) -> G,
) -> Result<Accumulated<G>> {
    let mut acc = Accumulated {
        grads: None,
        loss_sum: 0.0,
        loss_tokens: 0,
        step_tokens: 0,
    };
    for k in 0..c.grad_accum {
        let g = step * c.grad_accum + k;
        let batch = batches.micro_batch(g)?;
        acc.step_tokens += batch.iter().map(|s| s.ids.len()).sum::<usize>();
        let dropout = (c.lora.dropout > 0.0).then(|| Dropout {
            p: c.lora.dropout,
            seed: splitmix(c.seed ^ splitmix(g as u64)),
        });
        let (loss, grads) = grads_of(&batch, dropout)?;
        supportlm_fsio::chaos::point("train: a micro-batch's gradients computed");
        acc.loss_sum += loss.sum;
        acc.loss_tokens += loss.tokens;
        acc.grads = Some(match acc.grads.take() {
            None => grads,
            Some(sum) => add(sum, grads),
        });
    }
    Ok(acc)
}

/// Runs optimizer step `step` (0-based) of `schedule`: accumulates its micro-batches' gradients,
/// averages them per target token, clips and applies AdamW (on the device for weights resident there,
/// where only the loss and the gradient norm are read back).
#[allow(clippy::too_many_arguments)]
pub(super) fn optimizer_step(
    model: &mut QloraModel,
    weights: &mut Weights,
    adam: &mut AdamState,
    opt: &AdamW,
    c: &TrainConfig,
    schedule: &Schedule,
    step: usize,
    batches: &mut Batches,
) -> Result<StepStats> {
    let lr = lr_at(step, schedule.total_steps, schedule.warmup, c.lr);
    let (loss_sum, loss_tokens, tokens, grad_norm) = match weights {
        w if w.is_on_device() => {
            let acc = accumulate(
                c,
                step,
                batches,
                |batch, dropout| w.device_loss_and_grads(model, batch, dropout),
                |a, b| a.into_iter().zip(b).map(|(x, y)| x + y).collect(),
            )?;
            let Some(grads) = acc.grads else {
                return Err(TrainError::Internal("a step without micro-batches".into()));
            };
            let per_token = 1.0 / acc.loss_tokens.max(1) as f32;
            let grads = grads.into_iter().map(|g| g.mul_scalar(per_token)).collect();
            let (grads, norm) = clip_global_norm_on_device(grads, c.max_grad_norm)?;
            w.update_on_device(model, opt.begin_step(adam, lr), grads)?;
            let norm = to_vec(norm)?.first().copied().unwrap_or(f32::NAN);
            (acc.loss_sum, acc.loss_tokens, acc.step_tokens, norm as f64)
        }
        w => {
            let acc = accumulate(
                c,
                step,
                batches,
                |batch, dropout| w.loss_and_grads(model, batch, dropout),
                |mut sum: Vec<Vec<f32>>, flat| {
                    sum.iter_mut()
                        .zip(&flat)
                        .for_each(|(a, f)| a.iter_mut().zip(f).for_each(|(x, y)| *x += y));
                    sum
                },
            )?;
            let mut grads = acc.grads.unwrap_or_default();
            let scale = 1.0 / acc.loss_tokens.max(1) as f32;
            grads
                .iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= scale));
            let grad_norm = clip_global_norm(
                &mut grads
                    .iter_mut()
                    .map(|g| g.as_mut_slice())
                    .collect::<Vec<_>>(),
                c.max_grad_norm,
            );
            let coefficients = opt.begin_step(adam, lr);
            w.update(model, coefficients, adam, &grads)?;
            (acc.loss_sum, acc.loss_tokens, acc.step_tokens, grad_norm)
        }
    };
    Ok(StepStats {
        loss: loss_sum / loss_tokens.max(1) as f64,
        tokens,
        grad_norm,
        lr,
    })
}
