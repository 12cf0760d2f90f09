//! The model crate of supportlm, inference only: a Burn llama/qwen2 decoder that runs SmolLM2 (and
//! Qwen2.5) from GGUF files and Hugging Face folders.
//!
//! What lives where:
//! - [`config`] mirrors `config.json`; [`names`] spells every checkpoint tensor name (Hugging Face and
//!   GGUF); [`loader`] maps checkpoints to fields through it.
//! - [`llama`] is the decoder (llama and qwen2) in Burn ([`weight`]: its linear weights, f32 or int8 / NF4
//!   dequantized when a layer runs), [`cache`] its KV cache (its passes of several tokens, prefill and
//!   scoring, run on host buffers on the CPU backend: `llama/host.rs`); [`decode`] is the
//!   token-by-token path over quantized weights with the kernels of `supportlm_quant`.
//! - [`rows`]: RMSNorm, RoPE and SwiGLU as row passes on host buffers (the prompt pass's and the
//!   training step's).
//! - [`tokenizer`] builds tokenizers from `tokenizer.json` or GGUF metadata; [`chat`] renders chat templates.
//! - [`sampling`], [`generate`]: picking tokens and the generation loop; [`score`]: candidate log-probs
//!   with a reusable prefix cache.
//! - [`model`]: the bundle (weights + tokenizer + template) and its loaders.
//! - [`lora`]: adapters (PEFT files, attach, merge); [`export`]: a model (an adapter merged in) as a
//!   Hugging Face folder.
//! - [`bert`]: the sentence encoder (all-MiniLM-L6-v2) for response similarity.
//! - [`tiny`]: tiny random checkpoints (HF folder and GGUF) for tests and CI.
//! - [`device`]: `--device cpu|wgpu[:N]|cuda[:N]` (Burn's GPU backends behind the `wgpu` and `cuda`
//!   features); on the CPU the host paths run, elsewhere everything stays in Burn tensor ops.
//! - [`alloc`]: allocator settings the binaries apply for long tensor workloads.
//!
//! Not here: GGUF parsing and quantized kernels (`supportlm-quant`), datasets, prompts for the study's
//! tasks, training (`supportlm-train`: backprop, dropout, the optimizer), metrics.

pub mod alloc;
pub mod bert;
pub mod cache;
pub mod chat;
pub mod config;
pub mod decode;
pub mod device;
pub mod error;
pub mod export;
pub mod generate;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod model;
pub mod names;
pub mod rows;
pub mod sampling;
pub mod score;
pub mod tiny;
pub mod tokenizer;
pub mod weight;

pub use burn::tensor::Device;
pub use error::{ModelError, Result};
pub use model::Model;
pub use supportlm_quant::BaseQuant;

/// The CPU device (burn-flex) everything runs on by default (see [`device::DeviceSpec`] for the others).
pub fn default_device() -> Device {
    Device::flex()
}
