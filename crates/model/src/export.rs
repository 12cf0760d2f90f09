//! Writes a model (with any merged adapter) as a Hugging Face folder that transformers, PEFT or this
//! project can load: `config.json`, `model.safetensors` (f32), `tokenizer.json`,
//! `tokenizer_config.json`.

use std::path::Path;

use serde_json::json;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::llama::{to_vec, Llama};
use crate::loader::write_safetensors;
use crate::model::Model;
use crate::names::{self, Target};
use crate::tokenizer::Tokenizer;

/// A weight under its Hugging Face name: name, shape, row-major values.
pub type NamedWeight = (String, Vec<usize>, Vec<f32>);

/// Every weight of `llama` under its Hugging Face name, with its shape.
fn named_weights(llama: &Llama) -> Result<Vec<NamedWeight>> {
    let mut out = Vec::new();
    let mut push = |name: String, t: Vec<usize>, v: Vec<f32>| out.push((name, t, v));
    push(
        names::EMBED_TOKENS.into(),
        llama.embed_tokens.dims().to_vec(),
        to_vec(llama.embed_tokens.clone())?,
    );
    for (i, layer) in llama.layers.iter().enumerate() {
        let ln = names::layer(i);
        for (name, norm) in [
            (ln.input_norm(), &layer.input_layernorm),
            (ln.post_attention_norm(), &layer.post_attention_layernorm),
        ] {
            push(
                name,
                norm.weight.dims().to_vec(),
                to_vec(norm.weight.clone())?,
            );
        }
        for target in Target::ALL {
            let linear = layer.linear(target);
            if linear.lora.is_some() {
                return Err(ModelError::Adapter(
                    "export needs merged weights: merge the adapter first".into(),
                ));
            }
            let p = ln.proj(target);
            push(
                p.weight(),
                linear.weight.dims().to_vec(),
                to_vec(linear.weight.tensor(&llama.device))?,
            );
            if let Some(bias) = &linear.bias {
                push(p.bias(), bias.dims().to_vec(), to_vec(bias.clone())?);
            }
        }
    }
    push(
        names::FINAL_NORM.into(),
        llama.norm.weight.dims().to_vec(),
        to_vec(llama.norm.weight.clone())?,
    );
    if let Some(head) = &llama.lm_head {
        push(
            names::LM_HEAD.into(),
            head.dims().to_vec(),
            to_vec(head.clone())?,
        );
    }
    Ok(out)
}

/// Exports `model` (whose decoder may have an adapter merged in) to `dir`.
pub fn export_hf_dir(model: &Model, dir: &Path) -> Result<()> {
    let weights = named_weights(&model.llama)?;
    write_hf_dir(dir, &model.llama.config, &model.tokenizer, &weights)
}

/// Writes `weights` (Hugging Face names) with `config` and `tokenizer` as a Hugging Face folder.
pub fn write_hf_dir(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    weights: &[NamedWeight],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        supportlm_fsio::write_atomic(&p, data).map_err(|e| ModelError::io(&p, e))
    };
    let views: Vec<(String, Vec<usize>, &[f32])> = weights
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &views, Some(metadata))?;

    let mut cfg = serde_json::to_value(config).map_err(|e| ModelError::Config(e.to_string()))?;
    cfg["architectures"] = json!([match config.model_type {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    }]);
    cfg["torch_dtype"] = json!("float32");
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    let tok = tokenizer;
    let tokenizer_json = tok
        .inner()
        .to_string(true)
        .map_err(|e| ModelError::Tokenizer(format!("serialising tokenizer.json: {e}")))?;
    write("tokenizer.json", tokenizer_json.as_bytes())?;
    let pad = tok.pad_id.and_then(|id| tok.inner().id_to_token(id));
    let tok_cfg = json!({
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": pad,
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tok_cfg)
            .unwrap_or_default()
            .as_bytes(),
    )
}
