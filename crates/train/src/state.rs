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
    /// The latest validation loss (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub last_val_loss: Option<f64>,
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
    // A failed write (a full disk) removes its temporary folder and leaves the previous checkpoints as
    // they were.
    if let Err(e) = write_checkpoint_files(&tmp, write_weights, optimizer, state) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    supportlm_fsio::chaos::point("checkpoint: renamed into place");
    let mut all = list(run_dir)?;
    while all.len() > keep.max(1) {
        let (old_step, old) = all.remove(0);
        // Renamed out of the checkpoint names first: a crash while removing it leaves a `.tmp-` folder
        // (named and removed on resume), never a half-removed folder that looks like a checkpoint.
        let doomed = run_dir.join(format!(".tmp-removing-{}", checkpoint_name(old_step)));
        std::fs::rename(&old, &doomed).map_err(|e| TrainError::io(&old, e))?;
        supportlm_fsio::chaos::point("checkpoint: an old one being removed");
        std::fs::remove_dir_all(&doomed).map_err(|e| TrainError::io(&doomed, e))?;
    }
    Ok(final_dir)
}

/// The files of a checkpoint, written into its temporary folder `tmp`.
fn write_checkpoint_files(
    tmp: &Path,
    write_weights: &dyn Fn(&Path) -> Result<()>,
    optimizer: &AdamState,
    state: &TrainerState,
) -> Result<()> {
    write_weights(tmp)?;
    supportlm_fsio::chaos::point("checkpoint: weights written");
    let mut tensors = Vec::new();
    for (i, (m, v)) in optimizer.m.iter().zip(&optimizer.v).enumerate() {
        tensors.push((format!("m.{i}"), vec![m.len()], m.as_slice()));
        tensors.push((format!("v.{i}"), vec![v.len()], v.as_slice()));
    }
    let meta =
        std::collections::HashMap::from([("adam_step".to_string(), optimizer.step.to_string())]);
    write_safetensors(&tmp.join("optimizer.safetensors"), &tensors, Some(meta))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| ck_err(tmp, e.to_string()))?;
    let state_path = tmp.join("trainer_state.json");
    supportlm_fsio::write_atomic(&state_path, json.as_bytes())
        .map_err(|e| TrainError::io(&state_path, e))?;
    supportlm_fsio::chaos::point("checkpoint: complete in its temporary folder");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            step,
            total_steps: 10,
            best_val_loss: None,
            last_val_loss: None,
            best_step: None,
            evals_without_improvement: 0,
            stopped_early: false,
            config: "seed = 1".into(),
        }
    }

    #[test]
    fn a_full_disk_during_a_checkpoint_leaves_the_previous_one_intact() {
        let dir = tempfile::tempdir().unwrap();
        let mut adam = AdamState::new(&[1000, 24]);
        adam.m[0][3] = 0.5;
        adam.step = 2;
        let weights = |d: &Path| {
            supportlm_fsio::write_atomic(&d.join("adapter.bin"), &[7u8; 4096])
                .map_err(|e| TrainError::io(d, e))
        };
        save(dir.path(), &weights, &adam, &state(2), 2).unwrap();
        let before: Vec<(String, String)> =
            ["optimizer.safetensors", "trainer_state.json", "adapter.bin"]
                .iter()
                .map(|f| {
                    let p = dir.path().join(checkpoint_name(2)).join(f);
                    (f.to_string(), supportlm_fsio::sha256_file(&p).unwrap())
                })
                .collect();

        // The disk fills up part-way through the next checkpoint (after the weights).
        adam.step = 4;
        supportlm_fsio::simulate_disk_full_after(Some(5000));
        let err = save(dir.path(), &weights, &adam, &state(4), 2);
        supportlm_fsio::simulate_disk_full_after(None);
        let err = err.expect_err("the write must fail").to_string();
        assert!(err.contains("no space left"), "{err}");

        // Step 2 is still the newest checkpoint, byte for byte, and nothing half-written is left.
        let ck = load_latest(dir.path(), &[1000, 24]).unwrap().unwrap();
        assert_eq!((ck.state.step, ck.optimizer.step), (2, 2));
        assert_eq!(ck.optimizer.m[0][3], 0.5);
        for (f, hash) in before {
            let p = dir.path().join(checkpoint_name(2)).join(&f);
            assert_eq!(supportlm_fsio::sha256_file(&p).unwrap(), hash, "{f}");
        }
        assert!(supportlm_fsio::leftovers(dir.path()).unwrap().is_empty());
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }
}
