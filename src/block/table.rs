//! `BlockTable`: one sequence's logical-to-physical block map, its tokens and its live window.

use std::hash::{DefaultHasher, Hash, Hasher};

use super::window::LiveWindow;
use super::BlockId;

/// State of one sequence: tokens, block table (`None` = released before the live window), window.
#[derive(Clone, Debug)]
pub struct BlockTable {
    /// Every token id of the sequence (prompt then generated), kept for recompute after preemption.
    pub tokens: Vec<u32>,
    /// Prompt tokens at admission.
    pub prompt_len: usize,
    /// The live window (`len` = tokens, `live_start`, the protected prefix, a pending prompt
    /// compression), the same type the engine planner keeps.
    pub window: LiveWindow,
    /// Physical block of each logical block; `None` once released by an eviction.
    pub blocks: Vec<Option<BlockId>>,
    /// Chained content hash of each full block, kept while no eviction has touched the sequence.
    pub hashes: Vec<u64>,
    /// Evictions applied so far; after the first one new blocks are no longer cacheable.
    pub compactions: usize,
}

impl BlockTable {
    /// Blocks this sequence references (excluding released entries).
    pub fn held(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.blocks.iter().flatten().copied()
    }
}

/// Content hash of a full block given the hash of the block before it (chained, like vLLM's
/// automatic prefix caching: equal hashes mean equal token prefixes, up to 64-bit collisions).
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}
