//! The one error type of the quant crate.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// What can go wrong reading quantized files or naming a format. Every variant is about the input
/// (a file or a value the user gave); the crate has no internal failure modes that return errors.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{path}: not a GGUF file (bad magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first four bytes.
        found: [u8; 4],
    },
    /// A GGUF version this reader does not know.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in its header.
        version: u32,
    },
    /// The file ends before something its header promises.
    #[error("{path}: file is truncated: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// The file's structure is wrong (bad type ids, overlapping tensors, absurd counts, …).
    #[error("{path}: malformed GGUF: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor type without a dequantizer.
    #[error("tensor `{tensor}`: unsupported tensor type {type_name} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")]
    UnsupportedTensorType {
        /// The tensor's name.
        tensor: String,
        /// The type's name.
        type_name: String,
    },
    /// A tensor the caller asked for is not in the file.
    #[error("tensor `{tensor}` is missing from the checkpoint")]
    MissingTensor {
        /// The tensor's name.
        tensor: String,
    },
    /// A value given to this crate is not valid (an unknown format name, a shape that does not match
    /// its data).
    #[error("invalid input: {0}")]
    Input(String),
}

impl QuantError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        QuantError::Io {
            path: path.into(),
            source,
        }
    }
}
