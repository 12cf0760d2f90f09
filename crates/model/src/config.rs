//! Model configuration, mirroring a Hugging Face `config.json` (llama and qwen2) field by field.
//! GGUF files are read into the same struct from their `{arch}.*` metadata keys.

use serde::{Deserialize, Serialize};

use supportlm_quant::gguf::{GgufFile, GgufValue};

use crate::error::{ModelError, Result};
use crate::names::Target;

/// The decoder architectures this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama (SmolLM2, Llama 2/3, …): no attention biases unless `attention_bias`.
    Llama,
    /// Qwen2 (Qwen2.5): biases on the q/k/v projections.
    Qwen2,
}

/// `config.json` of a llama or qwen2 checkpoint. Fields keep the Hugging Face names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `llama` or `qwen2`.
    pub model_type: Architecture,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the SwiGLU block.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    #[serde(default)]
    /// Key/value heads (grouped-query attention); `None` means as many as query heads.
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    /// Width of a head; `None` means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    /// RoPE base.
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    /// The context length.
    pub max_position_embeddings: usize,
    #[serde(default)]
    /// Whether the LM head is the embedding table.
    pub tie_word_embeddings: bool,
    /// Llama only: biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    /// The beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    /// End-of-sequence token(s).
    pub eos_token_id: Option<TokenIds>,
    /// Rope scaling is not supported; a checkpoint that sets it is refused rather than run wrongly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The checkpoint's dtype (informational).
    pub torch_dtype: Option<String>,
}

/// One token id or several (`eos_token_id` may be either in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

impl ModelConfig {
    /// Parameters of the whole model (embeddings, layers with biases, final norm, untied head).
    pub fn num_params(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * d, self.kv_heads() * d);
        let mut layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h;
        if self.qkv_bias() {
            layer += q + 2 * kv;
        }
        if self.o_bias() {
            layer += h;
        }
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * layer + h + head
    }

    /// Key/value heads (defaults to the query heads).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Biases on q/k/v.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == Architecture::Qwen2 || self.attention_bias
    }

    /// Bias on the output projection.
    pub fn o_bias(&self) -> bool {
        self.model_type == Architecture::Llama && self.attention_bias
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is set; rope scaling is not supported".into());
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim()
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        // Sizes a file claims are bounded before anything is allocated from them (the largest open
        // models stay far inside these).
        for (name, value, limit) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("head_dim", self.head_dim(), 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 20,
            ),
        ] {
            if value > limit {
                return bad(format!(
                    "{name} {value} is beyond what any supported model has (at most {limit})"
                ));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return bad(format!(
                "rms_norm_eps {} and rope_theta {} must be finite (rope_theta positive)",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// Bytes this model takes as f32 weights plus its RoPE tables: what loading it allocates (checked
    /// against the machine's memory before loading).
    pub fn load_bytes(&self) -> u64 {
        let rope = 2 * self.max_position_embeddings as u64 * self.head_dim() as u64;
        4 * (self.num_params() as u64 + rope)
    }

    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: ModelConfig = serde_json::from_str(text).map_err(|e| {
            ModelError::Config(format!(
                "config.json: {e} (supported model_type: llama, qwen2)"
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration from GGUF metadata (`general.architecture` and `{arch}.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| ModelError::Config("GGUF has no general.architecture".into()))?
            .to_string();
        let model_type = match arch.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(ModelError::Config(format!(
                    "GGUF architecture `{other}` is not supported (supported: llama, qwen2)"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| -> Result<usize> {
            file.get(&key(k))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata `{}` is missing", key(k))))
        };
        let float = |k: &str| file.get(&key(k)).and_then(GgufValue::as_f64);
        let token = |k: &str| file.get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let vocab_size = match uint("vocab_size") {
            Ok(v) => v,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .ok_or_else(|| {
                    ModelError::Config("GGUF has neither a vocab size nor a token list".into())
                })?,
        };
        let heads = uint("attention.head_count")?;
        let hidden = uint("embedding_length")?;
        let head_dim = uint("attention.key_length")
            .ok()
            .or_else(|| uint("rope.dimension_count").ok());
        let config = ModelConfig {
            model_type,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: uint("feed_forward_length")?,
            num_hidden_layers: uint("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: uint("attention.head_count_kv").ok(),
            head_dim: head_dim.filter(|d| heads == 0 || *d != hidden / heads),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(default_rope_theta()),
            max_position_embeddings: uint("context_length").unwrap_or(default_max_positions()),
            tie_word_embeddings: file
                .tensor_info(&crate::names::gguf(crate::names::LM_HEAD))
                .is_none(),
            attention_bias: false,
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_id: token("tokenizer.ggml.eos_token_id").map(TokenIds::One),
            rope_scaling: None,
            torch_dtype: None,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Target {
    /// `[out, in]` of this projection's weight.
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim());
        match self {
            Target::QProj => [c.num_attention_heads * d, h],
            Target::KProj | Target::VProj => [c.kv_heads() * d, h],
            Target::OProj => [h, c.num_attention_heads * d],
            Target::GateProj | Target::UpProj => [i, h],
            Target::DownProj => [h, i],
        }
    }

    /// Whether this projection has a bias in `c`'s architecture (qwen2's q/k/v; llama's with
    /// `attention_bias`).
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            Target::QProj | Target::KProj | Target::VProj => c.qkv_bias(),
            Target::OProj => c.o_bias(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_config_json_parses_with_defaults() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":151936,"hidden_size":1536,
            "intermediate_size":8960,"num_hidden_layers":28,"num_attention_heads":12,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":32768,"tie_word_embeddings":true,
            "eos_token_id":151645,"rope_scaling":null,"torch_dtype":"bfloat16"}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.kv_heads(), 2);
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.eos_token_id.unwrap().to_vec(), vec![151645]);
    }

    #[test]
    fn unsupported_architecture_and_bad_heads_are_named() {
        let e = ModelConfig::from_json(r#"{"model_type":"gpt2","vocab_size":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("supported model_type: llama, qwen2"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":3,"num_key_value_heads":2,"rms_norm_eps":1e-5}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of num_key_value_heads"), "{e}");
    }
}
