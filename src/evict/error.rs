//! Typed errors of the eviction layer: bad policy inputs, bad checkpoints, bad traces.

use crate::kernels::{KernelError, StatsMode};
use thiserror::Error;

/// Why an eviction-layer operation was refused.
#[derive(Debug, Error)]
pub enum EvictError {
    /// The shapes of what an eviction step sees disagree with each other.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A policy, budget, interval or sampling argument is out of range.
    #[error("invalid argument {name}: {why}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A CPU reference kernel refused its arguments.
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    /// A scorer checkpoint does not fit the model it is used with (every mismatch listed).
    #[error("scorer checkpoint does not match the model: {}", .0.join("; "))]
    CheckpointMismatch(Vec<String>),
    /// A scorer checkpoint was trained on statistics of another mode than the caller computes.
    #[error(
        "scorer checkpoint was trained on '{checkpoint}' statistics but they are computed in '{computed}' mode: a scorer only sees the inputs it was trained on in its own mode (use stats mode '{checkpoint}', or a checkpoint trained in '{computed}' mode)"
    )]
    StatsModeMismatch {
        /// The mode recorded in the checkpoint.
        checkpoint: StatsMode,
        /// The mode the caller computes the statistics in.
        computed: StatsMode,
    },
    /// A scorer checkpoint is malformed: missing or misshapen tensor, bad config.
    #[error("bad scorer checkpoint {path}: {why}")]
    BadCheckpoint {
        /// File that was read.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A trace file is malformed.
    #[error("bad trace {path}: {why}")]
    BadTrace {
        /// File that was read.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A safetensors buffer could not be parsed (truncated, corrupt header).
    #[error("safetensors {path}: {source}")]
    SafeTensors {
        /// File that was read.
        path: String,
        /// The parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A JSON config could not be parsed.
    #[error("json {path}: {source}")]
    Json {
        /// File that was read.
        path: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// Reading or writing a file failed.
    #[error("io {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl EvictError {
    /// Shorthand for [`EvictError::InvalidArgument`].
    pub(crate) fn arg(name: &'static str, why: impl Into<String>) -> Self {
        EvictError::InvalidArgument {
            name,
            why: why.into(),
        }
    }

    /// Shorthand for [`EvictError::BadCheckpoint`].
    pub(crate) fn bad_checkpoint(path: impl Into<String>, why: impl Into<String>) -> Self {
        EvictError::BadCheckpoint {
            path: path.into(),
            why: why.into(),
        }
    }

    /// Shorthand for [`EvictError::Io`].
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        EvictError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
