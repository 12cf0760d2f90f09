//! The one error type of the model crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    /// (The OS's words are part of the message, not a separate `source`: printed once, also by
    /// `{:#}` error chains.)
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        reason: std::io::Error,
    },
    /// A GGUF file or a quantized format could not be read.
    #[error(transparent)]
    Quant(#[from] supportlm_quant::QuantError),
    /// A checkpoint tensor has another shape than the configuration says.
    #[error("tensor `{tensor}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{tensor}` is missing from the checkpoint")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
    },
    /// A safetensors file cannot be read or written.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Loading would need more memory than the machine has available.
    #[error("{what} needs {} MB of memory; {} MB are available", needed / 1_000_000, available / 1_000_000)]
    TooLarge {
        /// What was being loaded.
        what: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes available (free memory and swap).
        available: u64,
    },
    /// `config.json` or GGUF metadata is missing a value or holds an unsupported one.
    #[error("config: {0}")]
    Config(String),
    /// The tokenizer cannot be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template cannot be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// An adapter does not fit the base (names, shapes, config).
    #[error("adapter: {0}")]
    Adapter(String),
    /// The device asked for cannot be used: an unknown name, a backend this binary was built without,
    /// or a GPU or driver that is not there.
    #[error("device: {0}")]
    Device(String),
    /// The caller's input is not valid (a prompt longer than the context, an unknown label, …).
    #[error("invalid input: {0}")]
    Input(String),
    /// A broken internal invariant: a bug in supportlm, not a problem with the input.
    #[error("internal error (a bug in supportlm, please report it): {0}")]
    Internal(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            reason: source,
        }
    }
}
