//! Supervised fine-tuning (LoRA / QLoRA) for supportlm.
//!
//! What lives where:
//! - [`config`]: the run configuration (TOML files under `configs/`, `--set key=value` overrides).
//! - [`examples`]: a record → chat-templated token ids with the loss on the assistant turn only.
//! - [`batching`]: seeded, length-bucketed batches.
//! - [`optim`]: AdamW, warmup + cosine learning rate, global-norm clipping.
//! - [`state`]: checkpoints (adapter, optimizer, scheduler, data position) written atomically.
//! - [`trainer`]: the loop: gradient accumulation, validation, early stopping, best adapter, resume,
//!   `metrics.jsonl`.
//!
//! The maths of one step (frozen quantized base, LoRA gradients) is in `supportlm_model::qlora`.

pub mod batching;
pub mod config;
pub mod error;
pub mod examples;
pub mod optim;
pub mod state;
pub mod trainer;

pub use config::{TrainConfig, Tuning};
pub use error::{Result, TrainError};
pub use trainer::{train, TrainOutcome};
