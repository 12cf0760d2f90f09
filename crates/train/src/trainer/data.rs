//! Data preparation: the records a run trains and validates on, encoded with the chat template, and
//! the step schedule that follows from them and the config.

use supportlm_data::augment::augment;
use supportlm_data::kshot::balanced_subset;
use supportlm_data::Record;
use supportlm_model::chat::ChatTemplate;
use supportlm_model::tokenizer::Tokenizer;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::examples::{encode_all, Encoded};

/// Mixed into the run's seed for the rewrites of [`supportlm_data::augment`] (their own stream).
const AUGMENT_SEED: u64 = 0xA06_0E27;

/// A run's encoded examples and its schedule.
pub struct Prepared {
    /// Training sequences (balanced subset when `train_examples` is set).
    pub train: Encoded,
    /// Validation sequences (a balanced subset of `val_examples`).
    pub val: Encoded,
    /// How many micro-batches and steps the run has.
    pub schedule: Schedule,
}

/// The step schedule of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Micro-batches per epoch.
    pub n_batches: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// Warmup steps of the learning rate.
    pub warmup: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

impl Schedule {
    /// The schedule for `n_sequences` training sequences under `c`: `epochs` passes (capped by
    /// `max_steps`; `epochs = 0` means exactly `max_steps`).
    pub fn new(n_sequences: usize, c: &TrainConfig) -> Self {
        let n_batches = n_sequences.div_ceil(c.batch_size);
        let steps_per_epoch = n_batches.div_ceil(c.grad_accum);
        let mut total_steps = steps_per_epoch * c.epochs.max(1);
        if let Some(m) = c.max_steps {
            total_steps = if c.epochs == 0 { m } else { total_steps.min(m) };
        }
        Schedule {
            n_batches,
            total_steps,
            warmup: (c.warmup_ratio * total_steps as f64).ceil() as usize,
            grad_accum: c.grad_accum,
        }
    }

    /// Epochs done after `step` optimizer steps.
    pub fn epoch_of(&self, step: usize) -> f64 {
        (step * self.grad_accum) as f64 / self.n_batches as f64
    }
}

/// Selects and encodes the run's examples; an empty training or validation set is an error naming it.
pub fn prepare(
    c: &TrainConfig,
    train: &[Record],
    validation: &[Record],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Prepared> {
    let train_records = match c.train_examples {
        Some(n) => balanced_subset(train, c.task, n, c.seed),
        None => train.to_vec(),
    };
    let train_records = augment(&train_records, &c.augment, c.seed ^ AUGMENT_SEED);
    let val_records = balanced_subset(validation, c.task, c.val_examples, c.seed ^ 1);
    let train = encode_all(c.task, &train_records, tokenizer, template, c.max_len)?;
    let val = encode_all(c.task, &val_records, tokenizer, template, c.max_len)?;
    if train.sequences.is_empty() || val.sequences.is_empty() {
        return Err(TrainError::Examples(format!(
            "no usable {} examples ({} train, {} validation) for task {}",
            if train.sequences.is_empty() {
                "training"
            } else {
                "validation"
            },
            train.sequences.len(),
            val.sequences.len(),
            c.task
        )));
    }
    if train.truncated > 0 {
        tracing::warn!(
            truncated = train.truncated,
            max_len = c.max_len,
            "training answers cut at max_len"
        );
    }
    let schedule = Schedule::new(train.sequences.len(), c);
    Ok(Prepared {
        train,
        val,
        schedule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(set: &[&str]) -> TrainConfig {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(None, &set).unwrap()
    }

    #[test]
    fn steps_follow_batches_accumulation_epochs_and_the_cap() {
        // 10 sequences in batches of 4: 3 micro-batches per epoch, 2 per step: 2 steps per epoch.
        let c = config(&[
            "batch_size=4",
            "grad_accum=2",
            "epochs=3",
            "warmup_ratio=0.1",
        ]);
        let s = Schedule::new(10, &c);
        assert_eq!((s.n_batches, s.total_steps, s.warmup), (3, 6, 1));
        assert_eq!(s.epoch_of(3), 2.0);
        let capped = Schedule::new(
            10,
            &config(&["batch_size=4", "grad_accum=2", "epochs=3", "max_steps=4"]),
        );
        assert_eq!(capped.total_steps, 4);
        // epochs = 0: exactly max_steps, however many epochs that takes.
        let exact = Schedule::new(
            10,
            &config(&["batch_size=4", "grad_accum=2", "epochs=0", "max_steps=9"]),
        );
        assert_eq!(exact.total_steps, 9);
    }
}
