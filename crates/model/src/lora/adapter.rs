//! LoRA adapter weights and their files in Hugging Face PEFT's format.
//!
//! A folder holds `adapter_config.json` (PEFT's `LoraConfig` keys) and `adapter_model.safetensors`
//! with tensors named by [`names::peft`] (`A` `[r, in]` and `B` `[out, r]` of each adapted projection). Loading checks every name and shape against the base model, so
//! an adapter made for another base is refused with the offending tensor named.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::{LoraConfig, Target};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::{write_safetensors, SafetensorsDir, TensorSource};
use crate::names::{self, Factor};

/// The adapter folder's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter folder's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The low-rank pair of one projection: `A` `[r, in]` and `B` `[out, r]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `A`, `[r, in]`.
    pub a: Vec<f32>,
    /// `B`, `[out, r]`.
    pub b: Vec<f32>,
}

/// An adapter: configuration plus one [`LoraPair`] per adapted `(layer, projection)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Rank, scaling, targets.
    pub config: LoraConfig,
    /// `base_model_name_or_path` in the PEFT config.
    pub base_model: String,
    /// The factors of each adapted `(layer, projection)`.
    pub weights: BTreeMap<(usize, Target), LoraPair>,
}

/// The keys of PEFT's `adapter_config.json` this project reads and writes (others are ignored on read).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Value>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Value>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    init_lora_weights: serde_json::Value,
}

impl PeftConfig {
    fn from_lora(config: &LoraConfig, base_model: &str) -> Self {
        let mut targets = config.targets.clone();
        targets.sort();
        targets.dedup();
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: config.r,
            lora_alpha: config.alpha,
            lora_dropout: config.dropout,
            target_modules: targets.iter().map(|t| t.as_str()).collect(),
            use_rslora: config.use_rslora,
            base_model_name_or_path: Some(base_model.to_string()),
            layers_to_transform: config.layers.as_ref().map(|l| l.clone().into()),
            bias: Some("none".into()),
            fan_in_fan_out: false,
            use_dora: false,
            modules_to_save: None,
            rank_pattern: Some(serde_json::json!({})),
            alpha_pattern: Some(serde_json::json!({})),
            inference_mode: true,
            init_lora_weights: true.into(),
        }
    }

    fn to_lora(&self) -> Result<LoraConfig> {
        let bad = |m: String| Err(ModelError::Adapter(m));
        if self.peft_type != "LORA" {
            return bad(format!(
                "peft_type is {:?}, only LORA is supported",
                self.peft_type
            ));
        }
        if let Some(t) = &self.task_type {
            if t != "CAUSAL_LM" {
                return bad(format!("task_type is {t:?}, expected CAUSAL_LM"));
            }
        }
        if self.use_dora {
            return bad("DoRA adapters (use_dora) are not supported".into());
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out adapters are not supported (llama uses nn.Linear)".into());
        }
        if let Some(b) = &self.bias {
            if b != "none" {
                return bad(format!("bias {b:?} is not supported (expected \"none\")"));
            }
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
            return bad("modules_to_save (fully trained extra modules) is not supported".into());
        }
        for (key, pattern) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            if pattern
                .as_ref()
                .is_some_and(|p| p.as_object().is_some_and(|o| !o.is_empty()))
            {
                return bad(format!("{key} (per-module ranks) is not supported"));
            }
        }
        let targets = match &self.target_modules {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| {
                            ModelError::Adapter(format!("target_modules entry {v} is not a string"))
                        })?
                        .parse::<Target>()
                })
                .collect::<Result<Vec<_>>>()?,
            other => {
                return bad(format!(
                    "target_modules must be a list of module names, found {other}"
                ))
            }
        };
        let layers = match &self.layers_to_transform {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => {
                Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize])
            }
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|x| x as usize).ok_or_else(|| {
                            ModelError::Adapter(format!(
                                "layers_to_transform entry {v} is not a layer index"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => {
                return bad(format!(
                    "layers_to_transform {other} is not a list of layers"
                ))
            }
        };
        Ok(LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            layers,
            use_rslora: self.use_rslora,
        })
    }
}

impl Adapter {
    /// A fresh adapter as PEFT initialises one: `A` Kaiming-uniform (`a = sqrt(5)`, so bound
    /// `1/sqrt(in)`), `B` zeros, drawn from `seed` in site order.
    pub fn init(
        config: LoraConfig,
        model: &ModelConfig,
        base_model: &str,
        seed: u64,
    ) -> Result<Self> {
        config.validate(model)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = BTreeMap::new();
        for (layer, target) in config.sites(model) {
            let [out, inp] = target.shape(model);
            let bound = 1.0 / (inp as f32).sqrt();
            let a = (0..config.r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            weights.insert(
                (layer, target),
                LoraPair {
                    a,
                    b: vec![0.0; out * config.r],
                },
            );
        }
        Ok(Adapter {
            config,
            base_model: base_model.to_string(),
            weights,
        })
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.weights.values().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// `s · B · A`, `[out, in]` row-major, for one adapted projection.
    pub fn delta(&self, layer: usize, target: Target, model: &ModelConfig) -> Option<Vec<f32>> {
        let pair = self.weights.get(&(layer, target))?;
        let [out, inp] = target.shape(model);
        let r = self.config.r;
        let s = self.config.scale() as f32;
        let mut delta = vec![0f32; out * inp];
        delta.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            for k in 0..r {
                let bk = s * pair.b[o * r + k];
                if bk != 0.0 {
                    let a = &pair.a[k * inp..(k + 1) * inp];
                    for (d, &x) in row.iter_mut().zip(a) {
                        *d += bk * x;
                    }
                }
            }
        });
        Some(delta)
    }

    /// Checks that this adapter fits `model`: every site exists and every pair has the right shape.
    pub fn validate_for(&self, model: &ModelConfig) -> Result<()> {
        self.config.validate(model)?;
        let r = self.config.r;
        for (&(layer, target), pair) in &self.weights {
            if layer >= model.num_hidden_layers {
                return Err(ModelError::Adapter(format!(
                    "adapter has weights for layer {layer} but the base model has {} layers: it was made for another base",
                    model.num_hidden_layers
                )));
            }
            let [out, inp] = target.shape(model);
            for (which, len, shape) in [
                (Factor::A, pair.a.len(), [r, inp]),
                (Factor::B, pair.b.len(), [out, r]),
            ] {
                if len != shape[0] * shape[1] {
                    return Err(ModelError::Adapter(format!(
                        "`{}` has {len} values, the base model needs {shape:?}: the adapter was made for another base",
                        names::peft(layer, target, which)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (each atomically).
    pub fn save(&self, dir: &Path, model: &ModelConfig) -> Result<()> {
        self.validate_for(model)?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let r = self.config.r;
        let mut tensors = Vec::with_capacity(2 * self.weights.len());
        for (&(layer, target), pair) in &self.weights {
            let [out, inp] = target.shape(model);
            tensors.push((
                names::peft(layer, target, Factor::A),
                vec![r, inp],
                pair.a.as_slice(),
            ));
            tensors.push((
                names::peft(layer, target, Factor::B),
                vec![out, r],
                pair.b.as_slice(),
            ));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(metadata))?;
        let config = PeftConfig::from_lora(&self.config, &self.base_model);
        let json = serde_json::to_string_pretty(&config)
            .map_err(|e| ModelError::Adapter(format!("serialising the adapter config: {e}")))?;
        let path = dir.join(CONFIG_FILE);
        supportlm_fsio::write_atomic(&path, json.as_bytes()).map_err(|e| ModelError::io(&path, e))
    }

    /// Reads an adapter folder written by this project or by PEFT, checked against `model`.
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let peft: PeftConfig = serde_json::from_str(&text).map_err(|e| {
            ModelError::Adapter(format!(
                "{}: not a PEFT LoRA config: {e}",
                config_path.display()
            ))
        })?;
        let config = peft.to_lora()?;
        config.validate(model)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            return Err(ModelError::io(
                &weights_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights are missing"),
            ));
        }
        let file = SafetensorsDir::open_files(dir, vec![weights_path.clone()])?;
        let r = config.r;
        let mut weights = BTreeMap::new();
        let mut expected = std::collections::BTreeSet::new();
        for (layer, target) in config.sites(model) {
            let [out, inp] = target.shape(model);
            let mut get = |which: Factor, shape: [usize; 2]| -> Result<Vec<f32>> {
                let name = names::peft(layer, target, which);
                let (values, found) = file.tensor(&name)?.ok_or_else(|| {
                    ModelError::Adapter(format!(
                        "{}: tensor `{name}` is missing (the config targets {target} in layer {layer})",
                        weights_path.display()
                    ))
                })?;
                if found != shape {
                    return Err(ModelError::Adapter(format!(
                        "{}: tensor `{name}` has shape {found:?} but this base model needs {shape:?}: the adapter was made for another base",
                        weights_path.display()
                    )));
                }
                expected.insert(name);
                Ok(values)
            };
            let a = get(Factor::A, [r, inp])?;
            let b = get(Factor::B, [out, r])?;
            weights.insert((layer, target), LoraPair { a, b });
        }
        if let Some(extra) = file.names().find(|n| !expected.contains(*n)) {
            return Err(ModelError::Adapter(format!(
                "{}: unexpected tensor `{extra}` (not a LoRA weight of this base model's layers and targets)",
                weights_path.display()
            )));
        }
        Ok(Adapter {
            config,
            base_model: peft.base_model_name_or_path.unwrap_or_default(),
            weights,
        })
    }
}
