//! The run configuration: a TOML file (see `configs/`) with `--set key=value` overrides.

use std::path::Path;

use serde::{Deserialize, Serialize};
use supportlm_data::augment::AugmentConfig;
use supportlm_data::Task;
use supportlm_model::lora::LoraConfig;
use supportlm_quant::BaseQuant;

use crate::error::{Result, TrainError};

/// Everything that decides a training run. Two runs with equal configs (and equal data and base) give
/// byte-identical adapters on the same machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// category, intent or response.
    #[serde(with = "task_serde")]
    pub task: Task,
    /// What is trained: a LoRA adapter over the base (`lora`), or every parameter (`full`, which
    /// needs `base_quant = "none"`).
    pub tuning: Tuning,
    /// How the frozen base is stored: nf4 (QLoRA), int8 or none (f32).
    pub base_quant: BaseQuant,
    /// The adapter: rank, alpha, dropout, target projections.
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Share of the steps spent warming up linearly from 0; cosine decay to 0 after.
    pub warmup_ratio: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Passes over the training examples (0: run exactly `max_steps`).
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs when smaller).
    pub max_steps: Option<usize>,
    /// Longest sequence in tokens; longer examples are cut (and counted).
    pub max_len: usize,
    /// Clip gradients to this global L2 norm (0 disables).
    pub max_grad_norm: f64,
    /// Train on at most this many examples, balanced over labels (`None`: the whole train split).
    pub train_examples: Option<usize>,
    /// Validation examples used for the validation loss (balanced over labels).
    pub val_examples: usize,
    /// Validation loss every this many steps (and at the end).
    pub eval_every: usize,
    /// Stop when the validation loss has not improved by `min_delta` for this many evaluations.
    pub patience: Option<usize>,
    /// An evaluation improves on the best only by more than this.
    pub min_delta: f64,
    /// Write a checkpoint every this many steps; keep the last `keep_checkpoints`.
    pub save_every: usize,
    /// Checkpoints kept in the run folder (the oldest are removed).
    pub keep_checkpoints: usize,
    /// Seed of every random choice: example subsets, batches, adapter init, dropout.
    pub seed: u64,
    /// Rewrites of the training messages (placeholders filled, typing noise); off by default. The
    /// validation messages are never rewritten.
    #[serde(skip_serializing_if = "AugmentConfig::is_off")]
    pub augment: AugmentConfig,
    /// Keep every layer's activations for the backward pass (the fast path, `StepPath::Host` on the CPU).
    /// `false` recomputes each layer in backward instead (`StepPath::Recompute`): slower, for a model
    /// whose activations do not fit in memory.
    pub store_activations: bool,
}

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tuning {
    /// A LoRA adapter; the base stays frozen (in `base_quant`'s format).
    Lora,
    /// Every parameter of an f32 base (for the efficiency comparison).
    Full,
}

impl Tuning {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Tuning::Lora => "lora",
            Tuning::Full => "full",
        }
    }
}

mod task_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use supportlm_data::Task;

    pub fn serialize<S: Serializer>(t: &Task, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Task, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for TrainConfig {
    /// The original study's settings: lr 1e-4, LoRA r 8 / alpha 32 / dropout 0.05 on all projections.
    fn default() -> Self {
        TrainConfig {
            task: Task::Category,
            tuning: Tuning::Lora,
            base_quant: BaseQuant::Nf4,
            lora: LoraConfig::default(),
            lr: 1e-4,
            weight_decay: 0.0,
            warmup_ratio: 0.05,
            batch_size: 8,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            max_len: 256,
            max_grad_norm: 1.0,
            train_examples: None,
            val_examples: 200,
            eval_every: 100,
            patience: Some(3),
            min_delta: 0.0,
            save_every: 100,
            keep_checkpoints: 2,
            seed: 42,
            augment: AugmentConfig::default(),
            store_activations: true,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config and applies `key=value` overrides (dotted keys for sections: `lora.r=16`).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?;
                text.parse::<toml::Table>()
                    .map_err(|e| TrainError::Config(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            set(&mut table, o)?;
        }
        let config: TrainConfig = toml::Value::Table(table).try_into().map_err(|e| {
            TrainError::Config(format!(
                "{}{e}",
                path.map(|p| format!("{}: ", p.display()))
                    .unwrap_or_default()
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values fit together; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if let Err(m) = self.augment.validate() {
            return bad(&m);
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr must be a positive number");
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be at least 1");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("set epochs or max_steps");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio must be in [0, 1)");
        }
        if self.max_len < 8 {
            return bad("max_len must be at least 8 tokens");
        }
        if self.eval_every == 0 || self.save_every == 0 {
            return bad("eval_every and save_every must be at least 1");
        }
        if self.tuning == Tuning::Full && self.base_quant != BaseQuant::None {
            return bad("tuning = \"full\" trains every weight: set base_quant = \"none\"");
        }
        Ok(())
    }

    /// The config as TOML (saved with every run and checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Applies one `key=value` override. The value is read as TOML (`16`, `2e-4`, `true`, `["q_proj"]`),
/// or as a string when it is not valid TOML (`task=intent`).
fn set(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| TrainError::Config(format!("override {assignment:?} is not key=value")))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut node = table;
    for part in &parts[..parts.len() - 1] {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| TrainError::Config(format!("{key}: {part} is not a section")))?;
    }
    node.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_unknown_keys_are_refused() {
        let c = TrainConfig::load(
            None,
            &[
                "lr=2e-4".into(),
                "lora.r=16".into(),
                "task=intent".into(),
                "base_quant=int8".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.lr, 2e-4);
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.task, Task::Intent);
        assert_eq!(c.base_quant, BaseQuant::Int8);
        let err = TrainConfig::load(None, &["lerning_rate=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lerning_rate"), "{err}");
        assert!(TrainConfig::load(None, &["batch_size=0".into()]).is_err());
        assert!(TrainConfig::load(None, &["lora.targets=[\"qkv\"]".into()]).is_err());
        let err = TrainConfig::load(None, &["tuning=full".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_quant"), "{err}");
        let full =
            TrainConfig::load(None, &["tuning=full".into(), "base_quant=none".into()]).unwrap();
        assert_eq!(full.tuning, Tuning::Full);
    }

    #[test]
    fn config_round_trips_through_toml() {
        let c = TrainConfig {
            max_steps: Some(30),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, c.to_toml()).unwrap();
        assert_eq!(TrainConfig::load(Some(&p), &[]).unwrap(), c);
    }
}
