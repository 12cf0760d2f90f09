//! The model crate of supportlm: a Burn llama/qwen2 decoder that runs SmolLM2 (and Qwen2.5) from GGUF
//! files and Hugging Face folders.
//!
//! What lives where:
//! - [`gguf`] reads (and, for F32, writes) GGUF files; [`quants`] dequantizes GGML block types.
//! - [`config`] mirrors `config.json`; [`loader`] is the one place mapping checkpoint names to fields.
//! - [`llama`] is the decoder (llama and qwen2) in Burn, [`cache`] its KV cache; [`decode`] is the
//!   token-by-token path over quantized weights with the SIMD kernels of [`kernels`].
//! - [`tokenizer`] builds tokenizers from `tokenizer.json` or GGUF metadata; [`chat`] renders chat templates.
//! - [`sampling`], [`generate`]: picking tokens and the generation loop; [`score`]: candidate log-probs
//!   with a reusable prefix cache.
//! - [`model`]: the bundle (weights + tokenizer + template) and its loaders.
//! - [`base_quant`] (NF4 / int8 frozen weights), [`lora`] (adapters: PEFT files, attach, merge) and
//!   [`qlora`] (the trainable model: loss and gradients, LoRA or full fine-tuning).
//! - [`bert`]: the sentence encoder (all-MiniLM-L6-v2) for response similarity.
//! - [`tiny`]: tiny random checkpoints (HF folder and GGUF) for tests and CI.
//! - [`alloc`]: allocator settings the binaries apply for long tensor workloads.
//!
//! Not here: datasets, prompts for the study's tasks, training, metrics.

pub mod alloc;
pub mod base_quant;
pub mod bert;
pub mod cache;
pub mod chat;
pub mod config;
pub mod decode;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod model;
pub mod qlora;
pub mod quants;
pub mod sampling;
pub mod score;
pub mod tiny;
pub mod tokenizer;

pub use burn::tensor::Device;
pub use error::{ModelError, Result};
pub use model::Model;

/// The CPU device (burn-flex) everything runs on by default.
pub fn default_device() -> Device {
    Device::flex()
}
