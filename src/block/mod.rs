//! The block manager: a fixed pool of KV-cache blocks, per-sequence block tables, the live window
//! (section 2 of the shared design notes, DESIGN.md; summarised in ARCHITECTURE.md), prefix sharing
//! and copy-on-write, with typed errors and thread safety.
//!
//! Contract (shared with `replay` and the bindings; names and meanings are stable):
//! - Positions are logical token indices; a slot is `block * block_size + pos % block_size` (i64).
//! - `add_sequence` allocates the whole prompt (prefill needs it all) and returns its slots; with
//!   prefix caching, full prompt blocks cached under the same chained token-content hash are
//!   reused and their slots are -1 (already computed). The block of the last prompt token is never
//!   a cache hit, so every prompt computes at least one token. Full blocks are cached while the
//!   sequence has not been compacted (prompt and generated blocks alike), as soon as they are
//!   allocated: the engine must compute a block before a later-scheduled sequence reads the hit
//!   (step order guarantees it). Freed cached blocks stay reusable until the pool hands them out
//!   again (least recently freed first); a block the compaction kernel rewrites leaves the cache.
//! - Copy-on-write: a write into a shared block (`append` into a forked partial last block,
//!   `compact` over a shared window block) first moves the sequence to a fresh block and queues a
//!   [`BlockCopy`]; [`KvCacheManager::take_copies`] hands the queue out, and the engine performs
//!   those copies before the next call that allocates. Until then each queued copy holds a
//!   reference on its source, so a caller that shares blocks (fork, prefix hits) must call
//!   `take_copies` every step or those sources are never freed.
//! - Live window (eviction configured, budget `B`, interval `L`, multiples of the block size):
//!   `live_start` is block aligned, 0 before any eviction. Evictable window = `[base, len)` with
//!   `base = max(live_start, protected_len)`. An eviction is due when the window reaches `B + L`
//!   entries, or right after prefill when a prompt has at least `B + block_size` tokens (a shorter
//!   one has no whole block to release; not in protect mode); it moves
//!   `live_start` to `align_down(len - B)`, leaving at least `B` live (exactly `B` on the regular
//!   schedule, fewer than `B + block_size` after a prompt compression). `append` is refused with
//!   [`BlockError::EvictionDue`] while an eviction is due: `compact` applies it, empties the table
//!   entries in `[base, live_start)` (-1 in the flat tables, never reused by that sequence) and
//!   returns their blocks.
//! - Protect mode (`protect_prompt`): `protected_len = align_up(prompt_len)`; the prompt blocks
//!   (including the generated tokens that complete the last prompt block) are never evicted nor
//!   written, so they stay shareable; attention reads `[0, protected_len) ∪ [max(live_start,
//!   protected_len), len)`, which is `[0, len)` before the first eviction.
//! - Admission: [`KvCacheManager::max_blocks_held`] is the exact peak for one-token decode steps
//!   with evictions compacted when due: the window start is block aligned, so `B + L` entries span
//!   `(B + L) / block_size` blocks, plus the protected prompt blocks, or the whole prompt before its
//!   compression. An `append` of `k` tokens at once may overshoot `B + L` by up to `k - 1`
//!   entries (one more block) before the next `compact`.
//! - `preempt` removes the sequence and returns all its tokens; resume with `add_sequence`.

pub mod config;
pub mod error;
pub mod manager;
pub(crate) mod pool;
pub mod table;
pub mod window;

pub use config::{CacheConfig, EvictionConfig};
pub use error::{BlockError, WindowError};
pub use manager::{
    BlockCopy, FlatBlockTables, KvCacheManager, ManagerSnapshot, StepOp, StepOutput,
};
pub(crate) use pool::BlockPool;
pub use table::BlockTable;
pub use window::{
    Advance, EvictionPlan, LiveWindow, RequestWindow, Schedule, StepPlan, StepRequest,
    WindowPlanner,
};

/// Identifier of a sequence (a request, or one sample of it).
pub type SeqId = u64;
/// Physical block index in the pool.
pub type BlockId = u32;
