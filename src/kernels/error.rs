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
}
