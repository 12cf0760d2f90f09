//! The error type of the training crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What can stop a training run. Every variant but [`TrainError::Internal`] is about the input (a
/// file, a config value, the data) or the environment (I/O, an interruption).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or running the model failed (its own error says whose fault).
    #[error(transparent)]
    Model(#[from] supportlm_model::ModelError),
    /// The data could not be read or split.
    #[error(transparent)]
    Data(#[from] supportlm_data::DataError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Drawing the loss curve failed.
    #[error(transparent)]
    Plot(#[from] supportlm_plots::PlotError),
    /// A config file or `--set` override is not valid.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint cannot be used (missing, partial, written with another config).
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint or run folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The training data yields no usable examples.
    #[error("training data: {0}")]
    Examples(String),
    /// The run was asked to stop (Ctrl-C) and wrote a checkpoint first.
    #[error("interrupted (a checkpoint was written at step {step})")]
    Interrupted {
        /// The step of that checkpoint.
        step: usize,
    },
    /// A broken internal invariant: a bug in supportlm, not a problem with the input.
    #[error("internal error (a bug in supportlm, please report it): {0}")]
    Internal(String),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
