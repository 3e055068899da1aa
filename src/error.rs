//! The library's error type: one variant per kind of failure, each naming what failed and where.

use std::path::PathBuf;

/// Everything that can go wrong in the congeal library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image file is missing, truncated, corrupt or of an unsupported kind.
    #[error("cannot use image {path}: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A mask is empty, full, of the wrong size or otherwise unusable.
    #[error("cannot use mask {path}: {message}")]
    Mask {
        /// The mask file (or a description of its source).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A collection folder or its `collection.json` is malformed.
    #[error("invalid collection {path}: {message}")]
    Collection {
        /// The collection folder or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A mesh file is missing, malformed or empty.
    #[error("invalid mesh {path}: {message}")]
    Mesh {
        /// The mesh file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A run folder (output of `congeal run`) is missing files or malformed.
    #[error("invalid run folder {path}: {message}")]
    Run {
        /// The run folder or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weight file is missing, unreadable, or does not hold the tensors (names, shapes) a model expects.
    #[error("cannot use weights {path}: {message}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it, and what was expected.
        message: String,
    },
    /// A configuration value is missing or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An argument passed to a library function is out of its domain (sizes, NaN, empty sets...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An optimisation or numerical routine produced NaN/inf or failed to converge.
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// A tensor operation failed (shape mismatch, device error...).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A problem with a weight file (or an in-memory state dict) at `path`: unreadable, not
    /// safetensors, a missing or misshapen tensor. The message says what was found and expected.
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights { path: path.into(), message: message.into() }
    }
}
