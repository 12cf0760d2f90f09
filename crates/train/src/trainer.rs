//! The training loop: micro-batches with gradient accumulation, AdamW with warmup + cosine, global-norm
//! clipping, validation loss with early stopping and the best adapter kept, checkpoints and exact resume.
//!
//! Determinism: the micro-batch with global index `g` is batch `g mod n` of epoch `g / n` (batches from
//! [`epoch_batches`]), and its dropout seed is a hash of `(seed, g)`. The state after step `k` is
//! therefore the adapter and AdamW moments alone, which is what a checkpoint stores: a run interrupted
//! at any step and resumed ends with the same bytes as one that was never interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use supportlm_data::Record;
use supportlm_model::chat::ChatTemplate;
use supportlm_model::loader::{SafetensorsDir, TensorSource};
use supportlm_model::lora::Adapter;
use supportlm_model::qlora::{splitmix, Dropout, LossSum, QloraModel, Sequence};
use supportlm_model::tokenizer::Tokenizer;

use crate::batching::epoch_batches;
use crate::config::{TrainConfig, Tuning};
use crate::error::{Result, TrainError};
use crate::examples::{balanced_subset, encode_all};
use crate::optim::{clip_global_norm, lr_at, AdamState, AdamStep, AdamW};
use crate::state::{self, TrainerState};

/// What a run needs.
pub struct TrainJob<'a> {
    /// The base; with `tuning = "full"` its parameters are what is trained.
    pub model: &'a mut QloraModel,
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub train: &'a [Record],
    pub validation: &'a [Record],
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

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricsLine {
    pub step: usize,
    pub epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub peak_rss: u64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub steps: usize,
    pub total_steps: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub trainable_params: usize,
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: f64,
    pub best_val_loss: f64,
    pub best_step: usize,
    pub stopped_early: bool,
    /// The trained weights at the end: an adapter folder (LoRA) or a model folder (full).
    pub weights_dir: PathBuf,
    /// The weights with the best validation loss.
    pub best_weights_dir: PathBuf,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss: u64,
}

/// Peak resident memory of this process (`VmHWM`), 0 where unknown.
pub fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// The process's resident memory now, in bytes (0 where `/proc` is not available).
pub fn current_rss() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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
    Lora(Adapter),
    /// Every parameter; the values live in the model's tensors.
    Full,
}

impl Weights {
    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Weights::Lora(a) => Some(a),
            Weights::Full => None,
        }
    }

    /// The folder name of these weights inside a run or checkpoint folder.
    fn folder(&self) -> &'static str {
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
    fn write(&self, dir: &Path, model: &QloraModel, tokenizer: &Tokenizer) -> Result<()> {
        match self {
            Weights::Lora(a) => a.save(dir, &model.config)?,
            Weights::Full => model.save_full_hf_dir(dir, tokenizer)?,
        }
        Ok(())
    }

    /// Reads the weights a checkpoint folder holds (full: into the model's tensors).
    fn read(tuning: Tuning, checkpoint: &Path, model: &mut QloraModel) -> Result<Self> {
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
        sum += l.sum;
        tokens += l.tokens;
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Writes the weights as folder `dir` atomically (temporary folder, then rename).
fn save_weights_dir(
    dir: &Path,
    weights: &Weights,
    model: &QloraModel,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    weights.write(&tmp, model, tokenizer)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))
}

/// Keeps `metrics.jsonl` lines up to `step` (used when resuming), rewriting the file atomically.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    supportlm_fsio::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))
}

/// Draws `loss.svg` / `loss.png` in `run_dir` from its `metrics.jsonl`: training loss per step and
/// validation loss at each evaluation.
pub fn plot_losses(run_dir: &Path, title: &str) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["train_loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    let series = [
        supportlm_plots::Series {
            name: "train".into(),
            points: train,
        },
        supportlm_plots::Series {
            name: "validation".into(),
            points: val,
        },
    ];
    Ok(supportlm_plots::line_chart(
        &run_dir.join("loss"),
        title,
        "optimizer step",
        "loss per target token",
        &series,
    )?)
}

/// Runs (or resumes) a training job. `on_line` sees every metrics line as it is written.
pub fn train(job: TrainJob, on_line: &mut dyn FnMut(&MetricsLine, usize)) -> Result<TrainOutcome> {
    let c = job.config;
    let model = job.model;
    std::fs::create_dir_all(job.out_dir).map_err(|e| TrainError::io(job.out_dir, e))?;

    // Data.
    let train_records = match c.train_examples {
        Some(n) => balanced_subset(job.train, c.task, n, c.seed),
        None => job.train.to_vec(),
    };
    let val_records = balanced_subset(job.validation, c.task, c.val_examples, c.seed ^ 1);
    let train = encode_all(
        c.task,
        &train_records,
        job.tokenizer,
        job.template,
        c.max_len,
    )?;
    let val = encode_all(c.task, &val_records, job.tokenizer, job.template, c.max_len)?;
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
    let lengths: Vec<usize> = train.sequences.iter().map(|s| s.ids.len()).collect();
    let n_batches = lengths.len().div_ceil(c.batch_size);
    let steps_per_epoch = n_batches.div_ceil(c.grad_accum);
    let mut total_steps = steps_per_epoch * c.epochs.max(1);
    if let Some(m) = c.max_steps {
        total_steps = if c.epochs == 0 { m } else { total_steps.min(m) };
    }
    let warmup = (c.warmup_ratio * total_steps as f64).ceil() as usize;
    let opt = AdamW {
        weight_decay: c.weight_decay,
        ..Default::default()
    };
    let config_text = c.to_toml();
    let metrics_path = job.out_dir.join("metrics.jsonl");

    // Fresh start or resume.
    let existing = state::list(job.out_dir)?;
    let initial = match c.tuning {
        Tuning::Lora => Weights::Lora(Adapter::init(
            c.lora.clone(),
            &model.config,
            job.base_model,
            c.seed,
        )?),
        Tuning::Full => Weights::Full,
    };
    let (mut weights, mut adam, mut st) = if job.resume && !existing.is_empty() {
        let ck = state::load_latest(job.out_dir, &initial.sizes(model))?.ok_or_else(|| {
            TrainError::Checkpoint {
                path: job.out_dir.to_path_buf(),
                message: "no checkpoint".into(),
            }
        })?;
        if ck.state.config != config_text {
            return Err(TrainError::Checkpoint {
                path: ck.dir,
                message: "was written with a different config; resume with the same config or start a new run folder".into(),
            });
        }
        let weights = Weights::read(c.tuning, &ck.dir, model)?;
        truncate_metrics(&metrics_path, ck.state.step)?;
        tracing::info!(step = ck.state.step, dir = %ck.dir.display(), "resuming");
        (weights, ck.optimizer, ck.state)
    } else {
        if !existing.is_empty() {
            return Err(TrainError::Checkpoint {
                path: job.out_dir.to_path_buf(),
                message: "already holds checkpoints: pass --resume to continue, or choose a new run folder".into(),
            });
        }
        let weights = initial;
        let st = TrainerState {
            step: 0,
            total_steps,
            best_val_loss: None,
            best_step: None,
            evals_without_improvement: 0,
            stopped_early: false,
            config: config_text.clone(),
        };
        let _ = std::fs::remove_file(&metrics_path);
        let adam = AdamState::new(&weights.sizes(model));
        (weights, adam, st)
    };

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::io(&metrics_path, e))?;
    let started = Instant::now();
    let mut write_line = |line: &MetricsLine,
                          total: usize,
                          on_line: &mut dyn FnMut(&MetricsLine, usize)|
     -> Result<()> {
        let text = serde_json::to_string(line).unwrap_or_default();
        writeln!(metrics, "{text}")
            .and_then(|_| metrics.flush())
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        on_line(line, total);
        Ok(())
    };
    let epoch_of = |step: usize| (step * c.grad_accum) as f64 / n_batches as f64;
    let best_dir = job.out_dir.join(format!("best-{}", weights.folder()));
    let mut initial_val = None;

    // Validation, best weights and early stopping after `st.step` steps.
    let evaluate = |model: &QloraModel, weights: &Weights, st: &mut TrainerState| -> Result<f64> {
        let loss = validation_loss(model, weights.adapter(), &val.sequences, c.batch_size)?;
        let improved = st.best_val_loss.is_none_or(|b| loss < b - c.min_delta);
        if improved {
            st.best_val_loss = Some(loss);
            st.best_step = Some(st.step);
            st.evals_without_improvement = 0;
            save_weights_dir(&best_dir, weights, model, job.tokenizer)?;
        } else {
            st.evals_without_improvement += 1;
            if c.patience
                .is_some_and(|p| st.evals_without_improvement >= p)
            {
                st.stopped_early = true;
            }
        }
        Ok(loss)
    };

    if st.step == 0 {
        let loss = evaluate(model, &weights, &mut st)?;
        initial_val = Some(loss);
        write_line(
            &MetricsLine {
                step: 0,
                epoch: 0.0,
                train_loss: None,
                val_loss: Some(loss),
                lr: 0.0,
                grad_norm: None,
                tokens_per_s: 0.0,
                elapsed_s: 0.0,
                peak_rss: peak_rss(),
            },
            total_steps,
            on_line,
        )?;
    }

    let mut cached_epoch: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut tokens_seen = 0usize;
    let mut last_val = st.best_val_loss.unwrap_or(f64::NAN);
    while st.step < total_steps && !st.stopped_early {
        let step_start = Instant::now();
        let mut grads: Option<Vec<Vec<f32>>> = None;
        let (mut loss_sum, mut loss_tokens, mut step_tokens) = (0f64, 0usize, 0usize);
        for k in 0..c.grad_accum {
            let g = st.step * c.grad_accum + k;
            let (epoch, within) = (g / n_batches, g % n_batches);
            if cached_epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
                cached_epoch = Some((epoch, epoch_batches(&lengths, c.batch_size, c.seed, epoch)));
            }
            let batches = &cached_epoch
                .as_ref()
                .map(|(_, b)| b)
                .ok_or_else(|| TrainError::Examples("no batches".into()))?;
            let batch: Vec<Sequence> = batches[within]
                .iter()
                .map(|&i| train.sequences[i].clone())
                .collect();
            step_tokens += batch.iter().map(|s| s.ids.len()).sum::<usize>();
            let dropout = (c.lora.dropout > 0.0).then(|| Dropout {
                p: c.lora.dropout,
                seed: splitmix(c.seed ^ splitmix(g as u64)),
            });
            let (loss, flat) = weights.loss_and_grads(model, &batch, dropout)?;
            loss_sum += loss.sum;
            loss_tokens += loss.tokens;
            match grads.as_mut() {
                None => grads = Some(flat),
                Some(acc) => acc
                    .iter_mut()
                    .zip(&flat)
                    .for_each(|(a, f)| a.iter_mut().zip(f).for_each(|(x, y)| *x += y)),
            }
        }
        let mut grads = grads.unwrap_or_default();
        let scale = 1.0 / loss_tokens.max(1) as f32;
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
        let lr = lr_at(st.step, total_steps, warmup, c.lr);
        let coefficients = opt.begin_step(&mut adam, lr);
        weights.update(model, coefficients, &mut adam, &grads)?;
        drop(grads);
        st.step += 1;
        tokens_seen += step_tokens;

        let val_loss = if st.step % c.eval_every == 0 || st.step == total_steps {
            let l = evaluate(model, &weights, &mut st)?;
            last_val = l;
            Some(l)
        } else {
            None
        };
        write_line(
            &MetricsLine {
                step: st.step,
                epoch: epoch_of(st.step),
                train_loss: Some(loss_sum / loss_tokens.max(1) as f64),
                val_loss,
                lr,
                grad_norm: Some(grad_norm),
                tokens_per_s: step_tokens as f64 / step_start.elapsed().as_secs_f64(),
                elapsed_s: started.elapsed().as_secs_f64(),
                peak_rss: peak_rss(),
            },
            total_steps,
            on_line,
        )?;
        let interrupted = job.stop.is_some_and(|s| s.load(Ordering::SeqCst));
        if st.step % c.save_every == 0 || interrupted || st.stopped_early || st.step == total_steps
        {
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
    save_weights_dir(&weights_dir, &weights, model, job.tokenizer)?;
    let title = match c.tuning {
        Tuning::Lora => format!("{} SFT, LoRA on a {} base", c.task, c.base_quant),
        Tuning::Full => format!("{} SFT, full fine-tuning", c.task),
    };
    plot_losses(job.out_dir, &title)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainOutcome {
        steps: st.step,
        total_steps,
        train_examples: train.sequences.len(),
        val_examples: val.sequences.len(),
        truncated: train.truncated,
        skipped: train.skipped,
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
    })
}
