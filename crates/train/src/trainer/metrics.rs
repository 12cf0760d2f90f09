//! `metrics.jsonl`: one [`MetricsLine`] per optimizer step (and one for the evaluation before
//! training), appended and flushed as the run goes; read back typed for plots and reports.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The file's name inside a run folder.
pub const FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine {
    /// Optimizer steps done (0: the evaluation before training).
    pub step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Mean loss per target token of this step's batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Validation loss, on the steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Learning rate of this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Tokens (prompt included) per second of this step.
    pub tokens_per_s: f64,
    /// Seconds since this invocation started.
    pub elapsed_s: f64,
    /// Peak resident memory so far, bytes.
    pub peak_rss: u64,
}

/// `metrics.jsonl` opened for appending.
pub(super) struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `line` and flushes it.
    pub fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let text = serde_json::to_string(line)
            .map_err(|e| TrainError::Internal(format!("a metrics line does not serialize: {e}")))?;
        // Two writes, so that crash tests can land between them: a resumed run must drop the half line.
        let line = format!("{text}\n");
        let (first, second) = line.as_bytes().split_at(text.len() / 2);
        self.file
            .write_all(first)
            .map(|_| supportlm_fsio::chaos::point("metrics.jsonl: half a line appended"))
            .and_then(|_| self.file.write_all(second))
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Every line of a `metrics.jsonl` (lines that do not parse, e.g. one cut by a crash, are skipped).
pub fn read(path: &Path) -> Result<Vec<MetricsLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Keeps `metrics.jsonl` lines up to `step` (used when resuming), rewriting the file atomically.
pub(super) fn truncate(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let mut kept = String::new();
    for (i, l) in text.lines().enumerate() {
        match serde_json::from_str::<MetricsLine>(l) {
            Ok(m) if m.step <= step => {
                kept += l;
                kept.push('\n');
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                line = i + 1,
                "dropping a line an interrupted run left unfinished ({e})"
            ),
        }
    }
    supportlm_fsio::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))
}

/// Draws `loss.svg` / `loss.png` in `run_dir` from its `metrics.jsonl`: training loss per step and
/// validation loss at each evaluation.
pub fn plot_losses(run_dir: &Path, title: &str) -> Result<()> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in read(&run_dir.join(FILE))? {
        let step = line.step as f64;
        if let Some(l) = line.train_loss {
            train.push((step, l));
        }
        if let Some(l) = line.val_loss {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: usize, val: Option<f64>) -> MetricsLine {
        MetricsLine {
            step,
            epoch: step as f64 / 10.0,
            train_loss: (step > 0).then_some(1.0 / step as f64),
            val_loss: val,
            lr: 1e-3,
            grad_norm: (step > 0).then_some(0.5),
            tokens_per_s: 100.0,
            elapsed_s: step as f64,
            peak_rss: 1 << 20,
        }
    }

    #[test]
    fn lines_written_are_read_back_and_truncation_keeps_the_early_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut log = MetricsLog::open(&path).unwrap();
        let lines: Vec<MetricsLine> = (0..5)
            .map(|s| line(s, (s % 2 == 0).then_some(2.0)))
            .collect();
        for l in &lines {
            log.write(l).unwrap();
        }
        // A line cut by a crash is skipped, not an error.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\": 5, \"ep")
            .unwrap();
        assert_eq!(read(&path).unwrap(), lines);
        truncate(&path, 2).unwrap();
        assert_eq!(read(&path).unwrap(), lines[..3].to_vec());
        // Truncating a run that wrote no metrics yet is fine.
        truncate(&dir.path().join("absent.jsonl"), 3).unwrap();
    }
}
