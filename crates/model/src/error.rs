//! The one error type of the model crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file or a quantized format could not be read.
    #[error(transparent)]
    Quant(#[from] supportlm_quant::QuantError),
    #[error("tensor `{tensor}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{tensor}` is missing from the checkpoint")]
    MissingTensor { tensor: String },
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("adapter: {0}")]
    Adapter(String),
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
            source,
        }
    }
}
