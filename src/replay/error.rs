//! Typed errors of the trace replay: bad traces (with their line numbers), bad settings, and
//! failures of the block manager, the plot or the output files.

use std::path::PathBuf;

/// Everything that can go wrong in a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A trace row that cannot be used, with the 1-based line it is on.
    #[error("{trace}: line {line}: {message}")]
    BadRow {
        /// Trace name or path.
        trace: String,
        /// 1-based line number in the file (the header is line 1).
        line: u64,
        /// What is wrong with the row.
        message: String,
    },
    /// The trace header lacks a required column.
    #[error(
        "{trace}: missing column {column} (expected TIMESTAMP, ContextTokens, GeneratedTokens)"
    )]
    MissingColumn {
        /// Trace name or path.
        trace: String,
        /// The missing column.
        column: &'static str,
    },
    /// The trace (or the selection from it) holds no request.
    #[error("{0}: no requests")]
    EmptyTrace(String),
    /// A setting is out of range or inconsistent.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A model or GPU preset name that is not known.
    #[error("unknown {kind} preset {name:?}; known: {known}")]
    UnknownPreset {
        /// "model" or "gpu".
        kind: &'static str,
        /// The name given.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// The weights leave no memory for the KV cache.
    #[error("no KV memory: {usable_gib:.2} GiB usable at the memory fraction, weights take {weights_gib:.2} GiB")]
    NoKvMemory {
        /// GPU memory times the memory fraction, GiB.
        usable_gib: f64,
        /// Weight bytes, GiB.
        weights_gib: f64,
    },
    /// A request needs more blocks than the whole pool has, so it can never run.
    #[error("request {request} needs {needed} blocks but the pool has {capacity}")]
    RequestTooLarge {
        /// Index of the request in the scenario.
        request: usize,
        /// Blocks it needs.
        needed: usize,
        /// Blocks in the pool.
        capacity: usize,
    },
    /// The block manager refused an operation the scheduler cannot recover from.
    #[error("block manager: {0}")]
    Block(#[from] crate::block::BlockError),
    /// The scheduler could neither run nor admit anything although requests wait.
    #[error("scheduler stalled at {now_s:.3} s with {waiting} requests waiting")]
    Stalled {
        /// Simulated time.
        now_s: f64,
        /// Requests waiting.
        waiting: usize,
    },
    /// A measured-timings file is malformed.
    #[error("{path}: measured timings: {message}")]
    Timings {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// JSON output failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing the plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}
