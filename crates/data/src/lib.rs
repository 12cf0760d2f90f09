//! Bitext customer-support data for supportlm.
//!
//! What lives where:
//! - [`shipped`]: the project's own copy of the data under `data/bitext/` and its sha256 check.
//! - [`labels`]: the 11 categories and 27 intents, and which category each intent belongs to.
//! - [`load`]: CSV → typed [`Record`]s (through polars), with errors naming file, row and column.
//! - [`clean`]: text cleaning as the original study did it, and the normalisation used to find duplicates.
//! - [`split`]: leak-free stratified train/validation/test splits, written as JSONL + `manifest.json`.
//! - [`augment`]: training-time rewrites that take Bitext's template marks off the messages
//!   (placeholders filled with realistic values, typing noise).
//! - [`kshot`]: the balanced k-shot sampler (few-shot examples come from validation, never from test).
//! - [`robustness`]: the robustness set (prompt injection, abusive, off-topic and noisy messages) made
//!   reproducibly from the test split.
//! - [`prompts`]: every prompt's text, from `configs/prompts.toml` (compiled in; its sha256 goes with
//!   each run).
//! - [`task`]: the task views (category, intent, response) and their chat conversations, shared by
//!   prompting and fine-tuning so both see exactly the same task text.
//! - [`stats`]: label counts and length distributions.
//! - [`fsio`]: atomic file writes and sha256 (the shared `supportlm-fsio` crate).
//!
//! Not here: anything about models, tokenizers or metrics.

pub mod augment;
pub mod clean;
pub use supportlm_fsio as fsio;
pub mod error;
pub mod kshot;
pub mod labels;
pub mod load;
pub mod prompts;
pub mod robustness;
pub mod shipped;
pub mod split;
pub mod stats;
pub mod task;

pub use error::{DataError, Result};
pub use labels::{Category, Intent};
pub use load::{load_csv, Record};
pub use split::{Split, SplitConfig, SplitName, SplitSet};
pub use task::{Conversation, Message, Role, Task};
