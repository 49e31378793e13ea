//! Typed errors of the block manager: bad configuration, exhausted pool, unknown ids, misuse of the
//! eviction schedule.

use thiserror::Error;

use super::SeqId;

/// Everything the block manager can refuse; no operation panics on bad input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The pool cannot supply `needed` blocks: only `free` are free (nothing was changed).
    #[error("out of KV-cache blocks: needed {needed}, free {free}")]
    OutOfBlocks {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks free when it was refused.
        free: usize,
    },
    /// No sequence with this id is registered.
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    /// A sequence with this id is already registered.
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    /// The cache configuration is inconsistent (the message says which rule failed).
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    /// A sequence must start with at least one prompt token.
    #[error("sequence {0} has an empty prompt")]
    EmptyPrompt(SeqId),
    /// `append` was refused because an eviction is due and `compact` has not applied it yet.
    #[error("sequence {0} has an eviction due: call compact before appending")]
    EvictionDue(SeqId),
    /// `compact` was called while the schedule says no eviction is due.
    #[error("sequence {0} has no eviction due")]
    NoEvictionDue(SeqId),
    /// The host memory for the pool's bookkeeping could not be allocated.
    #[error("cannot allocate the bookkeeping of {blocks} blocks ({bytes} bytes of host memory)")]
    OutOfHostMemory {
        /// Blocks requested.
        blocks: usize,
        /// Bytes the bookkeeping needs.
        bytes: usize,
    },
    /// The sequence would grow past what the flat i32 device tables can address.
    #[error("sequence {id} would reach {len} tokens, more than the device tables address")]
    SequenceTooLong {
        /// The sequence.
        id: SeqId,
        /// The length it would have reached.
        len: usize,
    },
}

/// What the batched window planner refuses in the rows of a forward; nothing changed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WindowError {
    /// A row adds more tokens than its length.
    #[error("request {key}: {num_new} new tokens for a length of {seq_len}")]
    MoreNewThanLength {
        /// The request.
        key: u64,
        /// Tokens the row adds.
        num_new: usize,
        /// Its length after the forward.
        seq_len: usize,
    },
    /// A row's new tokens start before its live window (the engine must reset a request it recomputes).
    #[error(
        "request {key}: its new tokens start at {start}, before its live window [{live_start}, ...); \
         the engine must reset a request it recomputes"
    )]
    BeforeWindow {
        /// The request.
        key: u64,
        /// Position of the first new token.
        start: usize,
        /// The committed live start.
        live_start: usize,
    },
    /// Prompt tokens after an eviction in protect mode.
    #[error(
        "request {key}: prompt tokens after an eviction in protect mode; the engine must reset a \
         request it recomputes"
    )]
    PromptAfterEviction {
        /// The request.
        key: u64,
    },
    /// A request longer than the int32 device tables address.
    #[error("request {key}: length {len} is more than the int32 device tables address")]
    TooLong {
        /// The request.
        key: u64,
        /// Its length.
        len: usize,
    },
    /// A forward of more tokens than int32 query offsets address.
    #[error("a forward of {0} tokens is more than int32 query offsets address")]
    TooManyTokens(usize),
    /// A request key of 2^63 or more (keys travel as int64).
    #[error("request key {0} is 2^63 or more")]
    KeyTooLarge(u64),
    /// More requests with state than the slots reserved at start-up.
    #[error(
        "{needed} requests would hold state, more than the {max} request slots reserved at start-up \
         (raise the engine's maximum of concurrent requests)"
    )]
    TooManyRequests {
        /// Requests that would hold state after the forward.
        needed: usize,
        /// Slots reserved.
        max: usize,
    },
}
