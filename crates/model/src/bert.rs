//! BERT encoder for sentence embeddings (all-MiniLM-L6-v2 by default): WordPiece tokenizer from
//! `tokenizer.json`, `BertModel`'s last hidden state, mean pooling over the attention mask (the `[CLS]`
//! and `[SEP]` positions count), L2 normalisation — the sentence-transformers recipe.
//!
//! Reads a Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`); the names of
//! the checkpoint's tensors are mapped to modules in [`SentenceEncoder::load`] only.

use std::path::Path;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::llama::{to_vec, Linear};
use crate::loader::{SafetensorsDir, TensorSource};

/// The fields of a BERT `config.json` that the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    /// The feed-forward activation (only `gelu` is supported).
    pub hidden_act: String,
    /// Positions the position embeddings cover.
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    /// Token type (segment) embeddings.
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    fn validate(&self) -> Result<()> {
        if self.hidden_act != "gelu" {
            return Err(ModelError::Config(format!(
                "BERT hidden_act {:?} is not supported (only \"gelu\")",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(2);
        let normed = centered / (var + self.eps).sqrt();
        normed * self.weight.clone().unsqueeze::<3>() + self.bias.clone().unsqueeze::<3>()
    }
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl EncoderLayer {
    /// `mask`: `[b, 1, 1, s]`, 0 for real tokens and a large negative value for padding.
    fn forward(&self, x: Tensor<3>, mask: &Tensor<4>, heads: usize) -> Tensor<3> {
        let [b, s, hidden] = x.dims();
        let d = hidden / heads;
        let split = |t: Tensor<3>| t.reshape([b, s, heads, d]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt() + mask.clone();
        let context = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, s, hidden]);
        let x = self
            .attention_norm
            .forward(self.attention_output.forward(context) + x);
        let inner = gelu(self.intermediate.forward(x.clone()));
        self.output_norm.forward(self.output.forward(inner) + x)
    }
}

/// A sentence encoder: tokenizer + BERT + mean pooling + L2 normalisation.
pub struct SentenceEncoder {
    /// The checkpoint's configuration.
    pub config: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    word_embeddings: Tensor<2>,
    position_embeddings: Tensor<2>,
    token_type_embeddings: Tensor<2>,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    /// Longest input in tokens (sentence-transformers' `max_seq_length`; longer texts are cut).
    pub max_len: usize,
    device: Device,
}

impl SentenceEncoder {
    /// Loads a Hugging Face BERT folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config: BertConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", config_path.display())))?;
        config.validate()?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // tokenizer.json may carry padding/truncation for training; pooling is masked and the
        // length limit is applied here.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let src = SafetensorsDir::open(dir)?;
        let c = &config;
        let h = c.hidden_size;
        let get = |name: &str, shape: &[usize]| src.require(name, shape);
        let t1 = |name: &str, n: usize| -> Result<Tensor<1>> {
            Ok(Tensor::from_data(
                TensorData::new(get(name, &[n])?, [n]),
                device,
            ))
        };
        let t2 = |name: &str, r: usize, k: usize| -> Result<Tensor<2>> {
            Ok(Tensor::from_data(
                TensorData::new(get(name, &[r, k])?, [r, k]),
                device,
            ))
        };
        let linear = |p: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                t2(&format!("{p}.weight"), out, inp)?,
                Some(t1(&format!("{p}.bias"), out)?),
            ))
        };
        let norm = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: t1(&format!("{p}.weight"), h)?,
                bias: t1(&format!("{p}.bias"), h)?,
                eps: c.layer_norm_eps,
            })
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(EncoderLayer {
                    query: linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attention_output: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(
                        &format!("{p}.intermediate.dense"),
                        c.intermediate_size,
                        h,
                    )?,
                    output: linear(&format!("{p}.output.dense"), h, c.intermediate_size)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SentenceEncoder {
            tokenizer,
            word_embeddings: t2("embeddings.word_embeddings.weight", c.vocab_size, h)?,
            position_embeddings: t2(
                "embeddings.position_embeddings.weight",
                c.max_position_embeddings,
                h,
            )?,
            token_type_embeddings: t2(
                "embeddings.token_type_embeddings.weight",
                c.type_vocab_size,
                h,
            )?,
            embeddings_norm: norm("embeddings.LayerNorm")?,
            layers,
            max_len: 256.min(c.max_position_embeddings),
            config,
            device: device.clone(),
        })
    }

    /// Token ids with `[CLS]` and `[SEP]`, cut to `max_len` (keeping the final `[SEP]`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            let last = ids[ids.len() - 1];
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    /// L2-normalised embeddings of `texts` (one padded batch).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_>>()?;
        let b = ids.len();
        let s = ids.iter().map(Vec::len).max().unwrap_or(1);
        let h = self.config.hidden_size;
        let flat: Vec<i64> = ids
            .iter()
            .flat_map(|r| (0..s).map(move |t| r.get(t).map_or(0, |&x| x as i64)))
            .collect();
        let keep: Vec<f32> = ids
            .iter()
            .flat_map(|r| (0..s).map(move |t| if t < r.len() { 1.0 } else { 0.0 }))
            .collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * s]), &self.device);
        let words = self
            .word_embeddings
            .clone()
            .select(0, idx)
            .reshape([b, s, h]);
        let positions = self
            .position_embeddings
            .clone()
            .narrow(0, 0, s)
            .unsqueeze::<3>();
        let types = self
            .token_type_embeddings
            .clone()
            .narrow(0, 0, 1)
            .unsqueeze::<3>();
        let mut x = self.embeddings_norm.forward(words + positions + types);
        let keep_t = Tensor::<2>::from_data(TensorData::new(keep, [b, s]), &self.device);
        let mask = ((keep_t.clone() - 1.0) * 1e30).reshape([b, 1, 1, s]);
        for layer in &self.layers {
            x = layer.forward(x, &mask, self.config.num_attention_heads);
        }
        let weights = keep_t.clone().unsqueeze_dim::<3>(2);
        let pooled = (x * weights).sum_dim(1).reshape([b, h]) / keep_t.sum_dim(1).clamp_min(1e-9);
        let values = to_vec(pooled)?;
        Ok(values
            .chunks(h)
            .map(|v| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter().map(|x| x / norm).collect()
            })
            .collect())
    }
}

/// Cosine similarity of two vectors (the dot product when both are L2-normalised).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}
