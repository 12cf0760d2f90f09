//! The error type of the prompting crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = PromptError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
/// What can go wrong evaluating a method.
pub enum PromptError {
    #[error(transparent)]
    /// Loading or running the model failed.
    Model(#[from] supportlm_model::ModelError),
    #[error(transparent)]
    /// The data could not be read.
    Data(#[from] supportlm_data::DataError),
    #[error("{path}: {source}")]
    /// Reading or writing a run file failed.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// What the OS said.
        source: std::io::Error,
    },
    #[error(transparent)]
    /// Drawing a chart failed.
    Plot(#[from] supportlm_plots::PlotError),
    #[error("prompt: {0}")]
    /// A prompt cannot be built (a few-shot example without an answer, …) or a run file not read.
    Prompt(String),
    #[error("human evaluation: {0}")]
    /// A human-evaluation sheet or its key is malformed (unknown item or slot, a score out of range,
    /// a missing column): the user's input, named with its row.
    Human(String),
    #[error("judge: {0}")]
    /// The judge failed (unreachable endpoint, bad reply).
    Judge(String),
}

impl PromptError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PromptError::Io {
            path: path.into(),
            source,
        }
    }
}
