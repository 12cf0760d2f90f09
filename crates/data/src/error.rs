//! The one error type of this crate. Every variant names the file (and row/column where there is one).

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, validating, splitting or writing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file the command needs is not there.
    #[error("{path}: file is missing ({hint})")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// A shipped or manifest-listed file's hash does not match.
    #[error("{path}: file was altered: sha256 is {actual}, expected {expected} ({hint})")]
    Altered {
        /// The file.
        path: PathBuf,
        /// The recorded sha256.
        expected: String,
        /// The file's sha256 now.
        actual: String,
        /// What to do about it.
        hint: String,
    },
    /// The CSV has no header.
    #[error("{path}: file is empty (expected a header line `flags,instruction,category,intent,response` and rows)")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A cell is not UTF-8.
    #[error("{path}: row {row}, column `{column}`: invalid UTF-8 at byte offset {offset}")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// 1 = the first row after the header.
        row: usize,
        /// The column.
        column: String,
        /// Byte offset of the bad sequence in the cell.
        offset: usize,
    },
    /// The header names a column twice.
    #[error("{path}: header names column `{column}` twice")]
    DuplicateHeader {
        /// The file.
        path: PathBuf,
        /// The repeated column.
        column: String,
    },
    /// A required column is absent.
    #[error("{path}: missing column `{column}` (header has: {found})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The columns the header has.
        found: String,
    },
    /// A row's instruction is empty after cleaning.
    #[error("{path}: row {row}, column `instruction`: blank instruction")]
    BlankInstruction {
        /// The file.
        path: PathBuf,
        /// 1 = the first row after the header.
        row: usize,
    },
    /// A category or intent outside the dataset's label set.
    #[error(
        "{path}: row {row}, column `{column}`: unknown {column} `{value}` (allowed: {allowed})"
    )]
    UnknownLabel {
        /// The file.
        path: PathBuf,
        /// 1 = the first row after the header.
        row: usize,
        /// `category` or `intent`.
        column: String,
        /// The value found.
        value: String,
        /// The values allowed.
        allowed: String,
    },
    /// An intent paired with a category it does not belong to.
    #[error("{path}: row {row}: intent `{intent}` belongs to category `{expected}`, but the row says `{category}`")]
    IntentCategoryMismatch {
        /// The file.
        path: PathBuf,
        /// 1 = the first row after the header.
        row: usize,
        /// The row's intent.
        intent: String,
        /// The row's category.
        category: String,
        /// The intent's category.
        expected: String,
    },
    /// The CSV is malformed (unbalanced quotes, ragged rows, …).
    #[error("{path}: CSV could not be parsed: {message}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A JSONL line (split files) does not parse.
    #[error("{path}: line {line}: {message}")]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// Split settings that cannot work (ratios out of range, caps of zero, …).
    #[error("invalid split configuration: {0}")]
    InvalidConfig(String),
    /// Examples cannot be sampled as asked (too few per label, overlap with test, …).
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
