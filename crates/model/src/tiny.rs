//! Tiny random llama/qwen2 checkpoints for tests and CI: the same weights written as a Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`) and as an F32 GGUF file
//! (with llama.cpp's Q/K row permutation for llama), with a small byte-level BPE tokenizer; and random
//! weights of any size drawn on demand ([`RandomSource`], e.g. in Qwen2.5-1.5B's shapes) for benchmarks.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::chat::CHATML;
use crate::config::{Architecture, ModelConfig, TokenIds};
use supportlm_quant::gguf::{self, GgufValue};

use crate::error::{ModelError, Result};
use crate::loader::TensorSource;
use crate::names::{self, Target};
use crate::tokenizer::bpe_tokenizer_json;

/// Special tokens of the tiny tokenizer (ids 0, 1, 2), as in SmolLM2.
pub const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 6] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("e", "r"),
    ("o", "r"),
    ("Ġ", "a"),
];

/// A small configuration: 2 layers, hidden 32, 4 query heads over 2 KV heads, vocab 272.
pub fn config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        model_type: arch,
        vocab_size: 272,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 1024,
        tie_word_embeddings: arch == Architecture::Llama,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        rope_scaling: None,
        torch_dtype: Some("float32".into()),
    }
}

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// The tiny tokenizer: 3 special tokens, 256 byte tokens, a few merges.
pub fn vocabulary() -> (Vec<String>, Vec<String>, Vec<u64>) {
    let mut tokens: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![3u64; SPECIAL.len()];
    types.resize(tokens.len(), 1);
    (tokens, merges, types)
}

/// Random weights by Hugging Face name, shapes in PyTorch order.
pub fn weights(config: &ModelConfig, seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The order of the specs is the order of the random stream: keep it.
    specs(config)
        .into_iter()
        .map(|s| {
            let data = s.draw(&mut rng);
            (s.name, (s.shape, data))
        })
        .collect()
}

/// One random tensor: its name, shape and the range its values are drawn from.
struct Spec {
    name: String,
    shape: Vec<usize>,
    scale: f32,
    offset: f32,
}

impl Spec {
    /// `offset ± scale`, uniform.
    fn draw(&self, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let n: usize = self.shape.iter().product();
        (0..n)
            .map(|_| self.offset + self.scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect()
    }
}

/// Every tensor of a `config` model, in checkpoint order.
fn specs(config: &ModelConfig) -> Vec<Spec> {
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        out.push(Spec {
            name,
            shape,
            scale,
            offset,
        })
    };
    let h = config.hidden_size;
    add(
        names::EMBED_TOKENS.into(),
        vec![config.vocab_size, h],
        0.5,
        0.0,
    );
    let attention = [Target::QProj, Target::KProj, Target::VProj, Target::OProj];
    let mlp = [Target::GateProj, Target::UpProj, Target::DownProj];
    for l in 0..config.num_hidden_layers {
        let ln = names::layer(l);
        add(ln.input_norm(), vec![h], 0.1, 1.0);
        add(ln.post_attention_norm(), vec![h], 0.1, 1.0);
        let weight = |t: Target| (ln.proj(t).weight(), t.shape(config).to_vec());
        for t in attention {
            let (name, shape) = weight(t);
            add(name, shape, 0.3, 0.0);
        }
        if config.qkv_bias() {
            for t in [Target::QProj, Target::KProj, Target::VProj] {
                add(ln.proj(t).bias(), vec![t.shape(config)[0]], 0.1, 0.0);
            }
        }
        for t in mlp {
            let (name, shape) = weight(t);
            add(name, shape, 0.3, 0.0);
        }
    }
    add(names::FINAL_NORM.into(), vec![h], 0.1, 1.0);
    if !config.tie_word_embeddings {
        add(names::LM_HEAD.into(), vec![config.vocab_size, h], 0.5, 0.0);
    }
    out
}

/// Random weights for any configuration, drawn one tensor at a time when the loader asks (each from
/// its own seeded stream), so a model of real size (e.g. [`qwen2_5_1_5b`] for GPU benchmarks) is built
/// without a file or a second copy in memory. Weight values are the tiny models' ranges scaled by
/// `1/√fan-in` so activations stay finite over many layers.
pub struct RandomSource {
    specs: BTreeMap<String, Spec>,
    seed: u64,
}

impl RandomSource {
    /// The source of a `config` model's random weights.
    pub fn new(config: &ModelConfig, seed: u64) -> Self {
        let specs = specs(config)
            .into_iter()
            .map(|mut s| {
                if s.shape.len() == 2 && s.name != names::EMBED_TOKENS {
                    s.scale /= (s.shape[1] as f32).sqrt();
                }
                (s.name.clone(), s)
            })
            .collect();
        RandomSource { specs, seed }
    }
}

impl TensorSource for RandomSource {
    fn tensor(&self, hf_name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(spec) = self.specs.get(hf_name) else {
            return Ok(None);
        };
        let stream = hf_name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        Ok(Some((spec.draw(&mut rng), spec.shape.clone())))
    }
}

/// Qwen2.5-1.5B-Instruct's shapes (the original study's model, `config.json` of the Hugging Face
/// release): for benchmarks with [`RandomSource`], nothing to download.
pub fn qwen2_5_1_5b() -> ModelConfig {
    ModelConfig {
        model_type: Architecture::Qwen2,
        vocab_size: 151_936,
        hidden_size: 1536,
        intermediate_size: 8960,
        num_hidden_layers: 28,
        num_attention_heads: 12,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 32_768,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_id: Some(TokenIds::One(151_645)),
        rope_scaling: None,
        torch_dtype: Some("bfloat16".into()),
    }
}

/// Writes a Hugging Face folder for `config` with random weights from `seed`: one `model.safetensors`, or
/// with `shards > 1` that many `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json`.
pub fn write_hf_dir(dir: &Path, config: &ModelConfig, seed: u64, shards: usize) -> Result<()> {
    let io = |p: &Path, e| ModelError::io(p, e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        supportlm_fsio::write_atomic(&p, data).map_err(|e| io(&p, e))
    };
    let weights = weights(config, seed);
    let bytes: BTreeMap<&String, Vec<u8>> = weights
        .iter()
        .map(|(n, (_, d))| (n, d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let shards = shards.max(1);
    let mut weight_map = serde_json::Map::new();
    for shard in 0..shards {
        let views: Vec<(String, TensorView<'_>)> = weights
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == shard)
            .map(|(_, (n, (shape, _)))| {
                TensorView::new(Dtype::F32, shape.clone(), &bytes[n])
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ModelError::Internal(format!("tiny model tensors: {e}")))
            })
            .collect::<Result<_>>()?;
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", shard + 1)
        };
        for (name, _) in &views {
            weight_map.insert(name.clone(), json!(file));
        }
        let st = safetensors::serialize(views, None)
            .map_err(|e| ModelError::Internal(format!("tiny model safetensors: {e}")))?;
        write(&file, &st)?;
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        write("model.safetensors.index.json", index.to_string().as_bytes())?;
    }
    let mut cfg = serde_json::to_value(config)
        .map_err(|e| ModelError::Internal(format!("tiny model config: {e}")))?;
    cfg["architectures"] = json!([match config.model_type {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    }]);
    write("config.json", cfg.to_string().as_bytes())?;
    let (tokens, merges, types) = vocabulary();
    let pre = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    write(
        "tokenizer.json",
        bpe_tokenizer_json(&tokens, &merges, &types, pre)
            .to_string()
            .as_bytes(),
    )?;
    let tok_cfg = json!({"bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "pad_token": SPECIAL[2],
                         "add_bos_token": false, "chat_template": CHATML});
    write("tokenizer_config.json", tok_cfg.to_string().as_bytes())
}

/// Writes the same model as an F32 GGUF file.
pub fn write_gguf(path: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    let arch = match config.model_type {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let key = |k: &str| format!("{arch}.{k}");
    let (tokens, merges, types) = vocabulary();
    let strings =
        |v: &[String]| GgufValue::Array(v.iter().cloned().map(GgufValue::String).collect());
    let u = |v: usize| GgufValue::U32(v as u32);
    let metadata: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        (key("block_count"), u(config.num_hidden_layers)),
        (key("context_length"), u(config.max_position_embeddings)),
        (key("embedding_length"), u(config.hidden_size)),
        (key("feed_forward_length"), u(config.intermediate_size)),
        (key("attention.head_count"), u(config.num_attention_heads)),
        (key("attention.head_count_kv"), u(config.kv_heads())),
        (
            key("rope.freq_base"),
            GgufValue::F32(config.rope_theta as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(config.rms_norm_eps as f32),
        ),
        (key("vocab_size"), u(config.vocab_size)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(2)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        ),
        (
            "tokenizer.chat_template".into(),
            GgufValue::String(CHATML.into()),
        ),
    ];
    let mut weights = weights(config, seed);
    if config.model_type == Architecture::Llama {
        for (name, (shape, data)) in weights.iter_mut() {
            let heads = match names::gguf_target(&names::gguf(name)) {
                Some(Target::QProj) => config.num_attention_heads,
                Some(Target::KProj) => config.kv_heads(),
                _ => continue,
            };
            *data = permute_rows(data, heads, if shape.len() == 2 { shape[1] } else { 1 });
        }
    }
    let gguf_names: Vec<String> = weights.keys().map(|n| names::gguf(n)).collect();
    let tensors: Vec<(&str, &[usize], &[f32])> = weights
        .values()
        .zip(&gguf_names)
        .map(|((shape, data), name)| (name.as_str(), shape.as_slice(), data.as_slice()))
        .collect();
    Ok(gguf::write_f32(path, &metadata, &tensors)?)
}

/// llama.cpp's converter permutation of Q/K rows (the inverse of [`crate::loader::unpermute_rows`]).
pub fn permute_rows(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let order = crate::loader::unpermute_order(w.len() / cols, n_heads);
    let mut out = vec![0f32; w.len()];
    for (hf_row, &gguf_row) in order.iter().enumerate() {
        out[gguf_row * cols..(gguf_row + 1) * cols]
            .copy_from_slice(&w[hf_row * cols..(hf_row + 1) * cols]);
    }
    out
}
