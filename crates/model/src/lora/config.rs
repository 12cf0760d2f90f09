//! What an adapter adapts: rank, scaling, dropout, target projections and layers.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
pub use crate::names::Target;

impl FromStr for Target {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Target::ALL.iter().map(|t| t.as_str()).collect();
                ModelError::Adapter(format!(
                    "unknown LoRA target module {s:?} (expected one of {})",
                    known.join(" ")
                ))
            })
    }
}

/// LoRA hyper-parameters, as in PEFT's `LoraConfig` (missing keys take the defaults below).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Projections that get an adapter.
    pub targets: Vec<Target>,
    /// Layers that get adapters; `None` for all.
    pub layers: Option<Vec<usize>>,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// The original study's defaults: r 8, alpha 32, dropout 0.05, every linear projection.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 32.0,
            dropout: 0.05,
            targets: Target::ALL.to_vec(),
            layers: None,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor `s` in `y = W x + s · B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the settings against `model` (rank, layers in range).
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            return Err(ModelError::Adapter("LoRA rank r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Adapter(format!(
                "LoRA dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(ModelError::Adapter("no LoRA target modules".into()));
        }
        if let Some(layers) = &self.layers {
            if let Some(bad) = layers.iter().find(|&&l| l >= model.num_hidden_layers) {
                return Err(ModelError::Adapter(format!(
                    "LoRA layer {bad} does not exist: the model has {} layers",
                    model.num_hidden_layers
                )));
            }
        }
        Ok(())
    }

    /// Whether layer `layer` gets adapters.
    pub fn covers_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// Every adapted `(layer, target)`, in a fixed order.
    pub fn sites(&self, model: &ModelConfig) -> Vec<(usize, Target)> {
        let mut targets = self.targets.clone();
        targets.sort();
        targets.dedup();
        (0..model.num_hidden_layers)
            .filter(|&l| self.covers_layer(l))
            .flat_map(|l| targets.iter().map(move |&t| (l, t)))
            .collect()
    }

    /// Trainable parameters: `r · (in + out)` per adapted projection.
    pub fn trainable_params(&self, model: &ModelConfig) -> usize {
        self.sites(model)
            .iter()
            .map(|&(_, t)| {
                let [o, i] = t.shape(model);
                self.r * (o + i)
            })
            .sum()
    }
}
