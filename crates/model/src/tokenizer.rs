//! Tokenizers: a `tokenizers::Tokenizer` from a Hugging Face `tokenizer.json`, or built from the vocabulary,
//! merges, token types and pre-tokenizer name stored in GGUF metadata; plus the special token ids and the
//! chat template that come with it.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use supportlm_quant::gguf::{GgufFile, GgufValue};

/// A tokenizer with the facts about it a model runner needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The beginning-of-sequence token, if the model has one.
    pub bos_id: Option<u32>,
    /// Ids that end a turn or the text (EOS, `<|im_end|>`, `<|endoftext|>` where present).
    pub eos_ids: Vec<u32>,
    /// The padding token, if any.
    pub pad_id: Option<u32>,
    /// Whether BOS is prepended to a prompt.
    pub add_bos: bool,
    /// The checkpoint's Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// The BOS token's text.
    pub bos_token: Option<String>,
    /// The EOS token's text.
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// The GPT-2 style split used by Qwen2 and Llama 3 (`\p{N}` single or up to three digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE `tokenizer.json` (as a JSON value) from a vocabulary, merges (`"a b"`), GGUF token
/// types (3 = control, 4 = user-defined; both matched whole in text, control ones special) and a
/// pre-tokenizer.
pub fn bpe_tokenizer_json(
    tokens: &[String],
    merges: &[String],
    types: &[u64],
    pre_tokenizer: Value,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

impl Tokenizer {
    /// Token ids of a text. Special tokens written in the text (`<|im_start|>` …) are matched whole;
    /// BOS is prepended when the checkpoint asks for it and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of some ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The token strings of some ids (byte-level form, e.g. `Ġworld`).
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| self.inner.id_to_token(id).unwrap_or_default())
            .collect()
    }

    /// The id of token `token`, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a Hugging Face folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", config_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(ModelError::io(&config_path, e)),
        };
        // Special tokens are either strings or {"content": …} objects.
        let token_str = |key: &str| -> Option<String> {
            match &config[key] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let chat_template = match &config["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let mut tok = Tokenizer {
            bos_id: id(&bos_token),
            eos_ids: id(&eos_token).into_iter().collect(),
            pad_id: id(&token_str("pad_token")),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
            chat_template,
            bos_token,
            eos_token,
            inner,
        };
        tok.add_turn_end_ids();
        Ok(tok)
    }

    /// Builds the tokenizer stored in a GGUF file (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) with the
    /// pre-tokenizer named by `tokenizer.ggml.pre`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let get = |k: &str| file.get(k);
        let model = get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE); \
                 use the checkpoint's Hugging Face tokenizer.json instead"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata `{k}` is missing")))?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ModelError::Tokenizer(format!("GGUF metadata `{k}` holds a non-string"))
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let pre = get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "gpt2" | "default" => byte_level(true),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, default, qwen2, llama-bpe); \
                     use the checkpoint's Hugging Face tokenizer.json instead"
                )))
            }
        };
        let spec = bpe_tokenizer_json(&tokens, &merges, &types, pre_tokenizer);
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| ModelError::Tokenizer(format!("building the GGUF tokenizer: {e}")))?;
        let id = |k: &str| get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut tok = Tokenizer {
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            bos_id,
            eos_ids: eos_id.into_iter().collect(),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: get("tokenizer.ggml.add_bos_token")
                .and_then(GgufValue::as_bool)
                .unwrap_or(false),
            chat_template: get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
            inner,
        };
        tok.add_turn_end_ids();
        Ok(tok)
    }

    /// Chat models end a turn with their own marker; generation stops there as well as at EOS.
    fn add_turn_end_ids(&mut self) {
        for marker in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(id) = self.inner.token_to_id(marker) {
                if !self.eos_ids.contains(&id) {
                    self.eos_ids.push(id);
                }
            }
        }
    }
}
