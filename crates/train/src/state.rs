//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `checkpoint-{step:06}/` holds the trained weights (`adapter/` in PEFT format for LoRA, `model/` as a
//! Hugging Face folder for full fine-tuning), `optimizer.safetensors` (AdamW moments, one `m.{i}` /
//! `v.{i}` pair per trained tensor in order) and `trainer_state.json` (positions,
//! early-stopping state, config). A checkpoint is written into a temporary folder and renamed into
//! place, so a crash leaves either the old set of checkpoints or the new one, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use supportlm_model::loader::{write_safetensors, SafetensorsDir, TensorSource};

use crate::error::{Result, TrainError};
use crate::optim::AdamState;

/// Where the run is and what it has seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Steps the run's schedule has.
    pub total_steps: usize,
    /// The best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// The step that reached it.
    pub best_step: Option<usize>,
    /// Evaluations since the last improvement.
    pub evals_without_improvement: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The run's config (TOML), to refuse resuming with a different one.
    pub config: String,
}

/// A checkpoint read back (its weights are read by the caller from `dir`).
pub struct Checkpoint {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// AdamW's moments and step count.
    pub optimizer: AdamState,
    /// Where the run was.
    pub state: TrainerState,
}

fn ck_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The folder name of the checkpoint after `step` (`checkpoint-000042`).
pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step:06}")
}

/// Writes a checkpoint under `run_dir` and removes all but the newest `keep`.
/// `write_weights` writes the trained weights into the (temporary) checkpoint folder it is given.
pub fn save(
    run_dir: &Path,
    write_weights: &dyn Fn(&Path) -> Result<()>,
    optimizer: &AdamState,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = run_dir.join(checkpoint_name(state.step));
    let tmp = run_dir.join(format!(".tmp-{}", checkpoint_name(state.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write_weights(&tmp)?;
    let mut tensors = Vec::new();
    for (i, (m, v)) in optimizer.m.iter().zip(&optimizer.v).enumerate() {
        tensors.push((format!("m.{i}"), vec![m.len()], m.as_slice()));
        tensors.push((format!("v.{i}"), vec![v.len()], v.as_slice()));
    }
    let meta =
        std::collections::HashMap::from([("adam_step".to_string(), optimizer.step.to_string())]);
    write_safetensors(&tmp.join("optimizer.safetensors"), &tensors, Some(meta))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| ck_err(&tmp, e.to_string()))?;
    let state_path = tmp.join("trainer_state.json");
    supportlm_fsio::write_atomic(&state_path, json.as_bytes())
        .map_err(|e| TrainError::io(&state_path, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    let mut all = list(run_dir)?;
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(final_dir)
}

/// Checkpoints under `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::io(run_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(run_dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the newest checkpoint under `run_dir`, if any.
/// `sizes`: the length of every trained tensor, to check the optimizer state against.
pub fn load_latest(run_dir: &Path, sizes: &[usize]) -> Result<Option<Checkpoint>> {
    let Some((_, dir)) = list(run_dir)?.pop() else {
        return Ok(None);
    };
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| ck_err(&state_path, e.to_string()))?;
    let opt_path = dir.join("optimizer.safetensors");
    let file = SafetensorsDir::open_files(&dir, vec![opt_path.clone()])?;
    let mut optimizer = AdamState::new(&[]);
    for (i, &n) in sizes.iter().enumerate() {
        let get = |k: &str| -> Result<Vec<f32>> {
            let (v, _) = file
                .tensor(&format!("{k}.{i}"))?
                .ok_or_else(|| ck_err(&opt_path, format!("optimizer state {k}.{i} is missing")))?;
            if v.len() != n {
                return Err(ck_err(
                    &opt_path,
                    format!(
                        "optimizer state {k}.{i} has {} values, expected {n}",
                        v.len()
                    ),
                ));
            }
            Ok(v)
        };
        optimizer.m.push(get("m")?);
        optimizer.v.push(get("v")?);
    }
    let bytes = std::fs::read(&opt_path).map_err(|e| TrainError::io(&opt_path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| ck_err(&opt_path, e.to_string()))?;
    optimizer.step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adam_step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ck_err(&opt_path, "adam_step is missing from the metadata"))?;
    Ok(Some(Checkpoint {
        dir,
        optimizer,
        state,
    }))
}
