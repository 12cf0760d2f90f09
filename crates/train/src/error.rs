//! The error type of the training crate.

use std::path::PathBuf;

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("training data: {0}")]
    Examples(String),
    #[error("interrupted (a checkpoint was written at step {step})")]
    Interrupted { step: usize },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
