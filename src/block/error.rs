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
