//! LoRA adapters: configuration, PEFT-format files, attaching (unmerged) and merging.
//!
//! - [`config`]: rank, scaling, targets, layers; [`adapter`]: weights and PEFT file I/O.
//! - [`apply`]: attach an adapter to a loaded decoder (one base, any number of adapters) or merge it
//!   into the weights and back; [`MergedSource`] merges while loading. Writing a merged model as a
//!   Hugging Face folder is [`crate::export`].

pub mod adapter;
pub mod apply;
pub mod config;

pub use adapter::{Adapter, LoraPair};
pub use apply::{attach, merge, unmerge, MergedSource};
pub use config::{LoraConfig, Target};
