//! Supervised fine-tuning (LoRA / QLoRA, or every parameter) for supportlm.
//!
//! What lives where:
//! - [`qlora`]: the model being trained: a frozen base (f32, int8 or NF4 weights, [`qlora::frozen`])
//!   plus a LoRA adapter (or every parameter, `qlora/full.rs`), its loss and gradients for a batch
//!   (packed around a shared prompt prefix, `qlora/layout.rs`), dropout (`qlora/dropout.rs`), the
//!   hand-written layer backward (`qlora/backprop.rs`) and the same step on host buffers for the CPU
//!   (`qlora/host.rs`, with LoRA's row kernels in `qlora/low_rank.rs` and the exponentials in
//!   `qlora/pointwise.rs`); on a GPU the adapter's factors as one flat device tensor
//!   (`qlora/factors.rs`).
//! - [`config`]: the run configuration (TOML files under `configs/`, `--set key=value` overrides).
//! - [`examples`]: a record → chat-templated token ids with the loss on the assistant turn only.
//! - [`batching`]: seeded, length-bucketed batches.
//! - [`optim`]: AdamW, warmup + cosine learning rate, global-norm clipping (host loops, or tensor ops on
//!   a device).
//! - [`state`]: checkpoints (adapter, optimizer, scheduler, data position) written atomically.
//! - [`trainer`]: the loop: gradient accumulation, validation, early stopping, best adapter, resume,
//!   `metrics.jsonl`.
//!
//! Not here: inference (`supportlm-model`), quantized formats and their kernels (`supportlm-quant`).

pub mod batching;
pub mod config;
pub mod error;
pub mod examples;
pub mod optim;
pub mod qlora;
pub mod state;
pub mod trainer;

pub use config::{TrainConfig, Tuning};
pub use error::{Result, TrainError};
pub use supportlm_quant::BaseQuant;
pub use trainer::{train, TrainOutcome};
