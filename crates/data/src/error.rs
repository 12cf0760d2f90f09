//! The one error type of this crate. Every variant names the file (and row/column where there is one).

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, validating, splitting or writing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is missing ({hint})")]
    MissingFile { path: PathBuf, hint: String },
    #[error("{path}: file was altered: sha256 is {actual}, expected {expected} ({hint})")]
    Altered {
        path: PathBuf,
        expected: String,
        actual: String,
        hint: String,
    },
    #[error("{path}: file is empty (expected a header line `flags,instruction,category,intent,response` and rows)")]
    EmptyFile { path: PathBuf },
    #[error("{path}: row {row}, column `{column}`: invalid UTF-8 at byte offset {offset}")]
    InvalidUtf8 {
        path: PathBuf,
        row: usize,
        column: String,
        offset: usize,
    },
    #[error("{path}: header names column `{column}` twice")]
    DuplicateHeader { path: PathBuf, column: String },
    #[error("{path}: missing column `{column}` (header has: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}: row {row}, column `instruction`: blank instruction")]
    BlankInstruction { path: PathBuf, row: usize },
    #[error(
        "{path}: row {row}, column `{column}`: unknown {column} `{value}` (allowed: {allowed})"
    )]
    UnknownLabel {
        path: PathBuf,
        row: usize,
        column: String,
        value: String,
        allowed: String,
    },
    #[error("{path}: row {row}: intent `{intent}` belongs to category `{expected}`, but the row says `{category}`")]
    IntentCategoryMismatch {
        path: PathBuf,
        row: usize,
        intent: String,
        category: String,
        expected: String,
    },
    #[error("{path}: CSV could not be parsed: {message}")]
    Csv { path: PathBuf, message: String },
    #[error("{path}: line {line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid split configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Sampling(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
