//! Typed errors of kernel argument validation, shared by the CPU references and the CUDA launchers.

use thiserror::Error;

/// Why a kernel call was refused before touching memory.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A size argument is zero, negative or absurd.
    #[error("invalid {name}: {value} ({why})")]
    InvalidSize {
        /// Which argument.
        name: &'static str,
        /// The offending value.
        value: i64,
        /// What was expected.
        why: &'static str,
    },
    /// A stride is negative or makes rows overlap.
    #[error("invalid stride {name} = {value}: {why}")]
    InvalidStride {
        /// Which stride.
        name: &'static str,
        /// The offending value.
        value: i64,
        /// What was expected.
        why: &'static str,
    },
    /// A buffer is shorter than its shape and strides need.
    #[error("buffer {name} too small: has {have} elements, shape and strides need {need}")]
    BufferTooSmall {
        /// Which buffer.
        name: &'static str,
        /// Elements present.
        have: usize,
        /// Elements needed.
        need: usize,
    },
    /// A slot mapping entry points outside the cache.
    #[error("slot_mapping[{index}] = {slot} is outside the cache of {capacity} slots")]
    SlotOutOfRange {
        /// Position in the slot mapping.
        index: usize,
        /// The slot found there.
        slot: i64,
        /// num_blocks * block_size.
        capacity: i64,
    },
    /// Two arguments disagree on a dimension.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A sequence's live window is not `0 <= live_start <= len` with `live_start % block_size == 0`.
    #[error("sequence {seq}: live window [{live_start}, {len}) is invalid (need 0 <= live_start <= len, live_start a multiple of block_size)")]
    BadWindow {
        /// Sequence index in the batch.
        seq: usize,
        /// Its live start.
        live_start: i64,
        /// Its length.
        len: i64,
    },
    /// A sequence is longer than its block table row can map.
    #[error("sequence {seq}: length {len} is beyond its block table ({capacity} slots)")]
    LengthBeyondBlockTable {
        /// Sequence index in the batch.
        seq: usize,
        /// Its length.
        len: i64,
        /// block_table_stride * block_size.
        capacity: i64,
    },
    /// A block table entry used by a live window is outside the cache.
    #[error("sequence {seq}: block_tables[{index}] = {block} is outside the cache of {num_blocks} blocks")]
    BlockOutOfRange {
        /// Sequence index in the batch.
        seq: usize,
        /// Position in its block table row.
        index: usize,
        /// The block id found.
        block: i32,
        /// Blocks in the cache.
        num_blocks: i64,
    },
    /// A device pointer argument is null.
    #[error("device pointer {0} is null")]
    NullPointer(&'static str),
    /// An argument is outside what the kernel accepts.
    #[error("invalid argument {name}: {why}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// What is wrong with it.
        why: String,
    },
}
