//! LoRA adapters: configuration, PEFT-format files, attaching (unmerged), merging, and export.
//!
//! - [`config`]: rank, scaling, targets, layers; [`adapter`]: weights and PEFT file I/O.
//! - [`apply`]: attach an adapter to a loaded decoder (one base, any number of adapters) or merge it
//!   into the weights and back; [`MergedSource`] merges while loading; [`export`] writes a merged
//!   model as a Hugging Face folder.

pub mod adapter;
pub mod apply;
pub mod config;
pub mod export;

pub use adapter::{peft_name, Adapter, LoraPair};
pub use apply::{attach, merge, unmerge, MergedSource};
pub use config::{LoraConfig, Target};
