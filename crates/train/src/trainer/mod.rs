//! The training loop: micro-batches with gradient accumulation, AdamW with warmup + cosine, global-norm
//! clipping, validation loss with early stopping and the best adapter kept, checkpoints and exact resume.
//!
//! Its units, each in its own file: [`data`] (examples and the step schedule), [`resume`] (fresh start
//! or the newest checkpoint), [`step`] (one optimizer step), [`early_stopping`], [`metrics`]
//! (`metrics.jsonl` and the loss plot), [`weights`] (LoRA or full, their files); checkpoints are
//! [`crate::state`]. [`train`] strings them together.
//!
//! Determinism: the micro-batch with global index `g` is batch `g mod n` of epoch `g / n` (batches from
//! [`epoch_batches`]), and its dropout seed is a hash of `(seed, g)`. The state after step `k` is
//! therefore the adapter and AdamW moments alone, which is what a checkpoint stores: a run interrupted
//! at any step and resumed ends with the same bytes as one that was never interrupted.

pub mod data;
pub mod early_stopping;
pub mod metrics;
mod resume;
mod step;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use supportlm_data::Record;
use supportlm_model::chat::ChatTemplate;
use supportlm_model::tokenizer::Tokenizer;

use crate::config::{TrainConfig, Tuning};
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::qlora::QloraModel;
use crate::state::{self, TrainerState};

pub use early_stopping::EarlyStopping;
pub use metrics::{current_rss, peak_rss, plot_losses, MetricsLine};
pub use weights::{validation_loss, Weights};

/// What a run needs.
pub struct TrainJob<'a> {
    /// The base; with `tuning = "full"` its parameters are what is trained.
    pub model: &'a mut QloraModel,
    /// The base's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The base's chat template.
    pub template: &'a ChatTemplate,
    /// Training records.
    pub train: &'a [Record],
    /// Validation records.
    pub validation: &'a [Record],
    /// The run's settings.
    pub config: &'a TrainConfig,
    /// The run folder: checkpoints, `metrics.jsonl`, `adapter/` and `best-adapter/` (LoRA) or
    /// `model/` and `best-model/` (full fine-tuning).
    pub out_dir: &'a Path,
    /// `base_model_name_or_path` written into adapters.
    pub base_model: &'a str,
    /// Continue from the newest checkpoint in `out_dir`.
    pub resume: bool,
    /// When set (e.g. by Ctrl-C), the loop writes a checkpoint after the current step and returns
    /// [`TrainError::Interrupted`].
    pub stop: Option<&'a AtomicBool>,
}

/// What a finished run reports (`outcome.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Optimizer steps done.
    pub steps: usize,
    /// Steps the schedule had.
    pub total_steps: usize,
    /// Training sequences used.
    pub train_examples: usize,
    /// Validation sequences used.
    pub val_examples: usize,
    /// Training answers cut at `max_len`.
    pub truncated: usize,
    /// Training records dropped (no answer, or a prompt reaching `max_len`).
    pub skipped: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Validation loss before training (`None` when the run was resumed past it).
    pub initial_val_loss: Option<f64>,
    /// Validation loss at the end.
    pub final_val_loss: f64,
    /// The best validation loss.
    pub best_val_loss: f64,
    /// The step that reached it.
    pub best_step: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The trained weights at the end: an adapter folder (LoRA) or a model folder (full).
    pub weights_dir: PathBuf,
    /// The weights with the best validation loss.
    pub best_weights_dir: PathBuf,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Training tokens per second of this invocation.
    pub tokens_per_s: f64,
    /// Peak resident memory, bytes.
    pub peak_rss: u64,
    /// sha256 of the prompts file the training conversations were written with
    /// (`configs/prompts.toml`).
    #[serde(default)]
    pub prompts: String,
}

/// Runs (or resumes) a training job. `on_line` sees every metrics line as it is written, with the
/// run's total number of steps.
pub fn train(job: TrainJob, on_line: &mut dyn FnMut(&MetricsLine, usize)) -> Result<TrainOutcome> {
    let c = job.config;
    let model = job.model;
    std::fs::create_dir_all(job.out_dir).map_err(|e| TrainError::io(job.out_dir, e))?;
    let _lock = resume::lock_run_folder(job.out_dir)?;
    let prepared = data::prepare(c, job.train, job.validation, job.tokenizer, job.template)?;
    let schedule = prepared.schedule;
    let total_steps = schedule.total_steps;
    let resume::Start {
        weights,
        mut adam,
        state: mut st,
    } = resume::start(
        model,
        c,
        job.out_dir,
        job.base_model,
        job.resume,
        total_steps,
    )?;
    // On a GPU a LoRA run's factors and moments stay there, read back only for checkpoints.
    let mut weights = weights.resident(model, &adam)?;

    let mut log = metrics::MetricsLog::open(&job.out_dir.join(metrics::FILE))?;
    let mut write_line = |line: &MetricsLine| -> Result<()> {
        log.write(line)?;
        on_line(line, total_steps);
        Ok(())
    };
    let started = Instant::now();
    let best_dir = job.out_dir.join(format!("best-{}", weights.folder()));
    let stopping = EarlyStopping {
        min_delta: c.min_delta,
        patience: c.patience,
    };
    // Validation after `st.step` steps; the best weights are kept.
    let evaluate = |model: &QloraModel, weights: &Weights, st: &mut TrainerState| -> Result<f64> {
        let loss = validation_loss(model, weights, &prepared.val.sequences, c.batch_size)?;
        if stopping.record(st, loss) {
            weights::save_weights_dir(&best_dir, weights, model, job.tokenizer)?;
        }
        Ok(loss)
    };

    let mut initial_val = None;
    if st.step == 0 {
        let loss = evaluate(model, &weights, &mut st)?;
        initial_val = Some(loss);
        write_line(&MetricsLine {
            step: 0,
            epoch: 0.0,
            train_loss: None,
            val_loss: Some(loss),
            lr: 0.0,
            grad_norm: None,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
            peak_rss: peak_rss(),
        })?;
    }

    let opt = AdamW {
        weight_decay: c.weight_decay,
        ..Default::default()
    };
    let mut batches = step::Batches::new(&prepared.train.sequences, c, schedule.n_batches);
    let mut tokens_seen = 0usize;
    let mut last_val = st.last_val_loss.unwrap_or(f64::NAN);
    while st.step < total_steps && !st.stopped_early {
        let step_start = Instant::now();
        let stats = step::optimizer_step(
            model,
            &mut weights,
            &mut adam,
            &opt,
            c,
            &schedule,
            st.step,
            &mut batches,
        )?;
        st.step += 1;
        tokens_seen += stats.tokens;

        let val_loss = if st.step % c.eval_every == 0 || st.step == total_steps {
            let l = evaluate(model, &weights, &mut st)?;
            last_val = l;
            Some(l)
        } else {
            None
        };
        write_line(&MetricsLine {
            step: st.step,
            epoch: schedule.epoch_of(st.step),
            train_loss: Some(stats.loss),
            val_loss,
            lr: stats.lr,
            grad_norm: Some(stats.grad_norm),
            tokens_per_s: stats.tokens as f64 / step_start.elapsed().as_secs_f64(),
            elapsed_s: started.elapsed().as_secs_f64(),
            peak_rss: peak_rss(),
        })?;
        let interrupted = job.stop.is_some_and(|s| s.load(Ordering::SeqCst));
        if st.step % c.save_every == 0 || interrupted || st.stopped_early || st.step == total_steps
        {
            weights.sync_optimizer(&mut adam)?;
            let folder = weights.folder();
            let write = |dir: &Path| weights.write(&dir.join(folder), model, job.tokenizer);
            state::save(job.out_dir, &write, &adam, &st, c.keep_checkpoints)?;
        }
        if interrupted && st.step < total_steps {
            return Err(TrainError::Interrupted { step: st.step });
        }
    }
    if last_val.is_nan() {
        last_val = evaluate(model, &weights, &mut st)?;
    }
    let weights_dir = job.out_dir.join(weights.folder());
    weights::save_weights_dir(&weights_dir, &weights, model, job.tokenizer)?;
    let title = match c.tuning {
        Tuning::Lora => format!("{} SFT, LoRA on a {} base", c.task, c.base_quant),
        Tuning::Full => format!("{} SFT, full fine-tuning", c.task),
    };
    plot_losses(job.out_dir, &title)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainOutcome {
        steps: st.step,
        total_steps,
        train_examples: prepared.train.sequences.len(),
        val_examples: prepared.val.sequences.len(),
        truncated: prepared.train.truncated,
        skipped: prepared.train.skipped,
        trainable_params: weights.num_params(model),
        initial_val_loss: initial_val,
        final_val_loss: last_val,
        best_val_loss: st.best_val_loss.unwrap_or(last_val),
        best_step: st.best_step.unwrap_or(st.step),
        stopped_early: st.stopped_early,
        weights_dir,
        best_weights_dir: best_dir,
        seconds,
        tokens_per_s: tokens_seen as f64 / seconds.max(1e-9),
        peak_rss: peak_rss(),
        prompts: supportlm_data::prompts::sha256().to_string(),
    })
}
