//! The error type of the prompting crate.

use std::path::PathBuf;

pub type Result<T, E = PromptError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Model(#[from] supportlm_model::ModelError),
    #[error(transparent)]
    Data(#[from] supportlm_data::DataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plot(#[from] supportlm_plots::PlotError),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("judge: {0}")]
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
