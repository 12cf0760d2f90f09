//! Starting a run: fresh (initial weights, zero moments) or from the newest checkpoint of its folder,
//! refusing a checkpoint written with another config and a fresh start over existing checkpoints.

use std::path::Path;

use supportlm_model::lora::Adapter;

use super::metrics;
use super::weights::Weights;
use crate::config::{TrainConfig, Tuning};
use crate::error::{Result, TrainError};
use crate::optim::AdamState;
use crate::qlora::QloraModel;
use crate::state::{self, TrainerState};

/// Where a run starts from.
pub(super) struct Start {
    pub weights: Weights,
    pub adam: AdamState,
    pub state: TrainerState,
}

/// Names and removes what a killed run left half-written in `out_dir`: temporary checkpoint and
/// weights folders, temporary files of atomic writes. None of them is ever read as a result.
fn remove_leftovers(out_dir: &Path) -> Result<()> {
    for path in supportlm_fsio::leftovers(out_dir).map_err(|e| TrainError::io(out_dir, e))? {
        tracing::warn!(path = %path.display(), "removing what an interrupted run left unfinished");
        supportlm_fsio::remove_leftover(&path).map_err(|e| TrainError::io(&path, e))?;
    }
    Ok(())
}

/// Holds the run folder for this process: a second `train` on the same folder is refused (two writers
/// would interleave checkpoints). The lock is the operating system's and goes with the process, `kill -9`
/// included.
pub(super) fn lock_run_folder(out_dir: &Path) -> Result<std::fs::File> {
    let path = out_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TrainError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Checkpoint {
            path: out_dir.to_path_buf(),
            message: "another process is training in this folder".into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(TrainError::io(&path, e)),
    }
}

/// The state a run in `out_dir` starts from: the newest checkpoint when `resume` (its metrics lines
/// after that step dropped), else a fresh start (`metrics.jsonl` removed).
pub(super) fn start(
    model: &mut QloraModel,
    c: &TrainConfig,
    out_dir: &Path,
    base_model: &str,
    resume: bool,
    total_steps: usize,
) -> Result<Start> {
    let config_text = c.to_toml();
    let metrics_path = out_dir.join(metrics::FILE);
    remove_leftovers(out_dir)?;
    let existing = state::list(out_dir)?;
    let initial = match c.tuning {
        Tuning::Lora => Weights::Lora(Adapter::init(
            c.lora.clone(),
            &model.config,
            base_model,
            c.seed,
        )?),
        Tuning::Full => Weights::Full,
    };
    if resume && !existing.is_empty() {
        let ck = state::load_latest(out_dir, &initial.sizes(model))?.ok_or_else(|| {
            TrainError::Checkpoint {
                path: out_dir.to_path_buf(),
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
        metrics::truncate(&metrics_path, ck.state.step)?;
        tracing::info!(step = ck.state.step, dir = %ck.dir.display(), "resuming");
        return Ok(Start {
            weights,
            adam: ck.optimizer,
            state: ck.state,
        });
    }
    if !existing.is_empty() {
        return Err(TrainError::Checkpoint {
            path: out_dir.to_path_buf(),
            message:
                "already holds checkpoints: pass --resume to continue, or choose a new run folder"
                    .into(),
        });
    }
    let state = TrainerState {
        step: 0,
        total_steps,
        best_val_loss: None,
        last_val_loss: None,
        best_step: None,
        evals_without_improvement: 0,
        stopped_early: false,
        config: config_text,
    };
    let _ = std::fs::remove_file(&metrics_path);
    let adam = AdamState::new(&initial.sizes(model));
    Ok(Start {
        weights: initial,
        adam,
        state,
    })
}
