//! Serde configuration of the paged KV cache and its eviction schedule, with validation.

use serde::{Deserialize, Serialize};

use super::{BlockError, BlockPool};

/// Eviction schedule of every sequence: keep `budget` live entries, evict `interval` at a time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvictionConfig {
    /// Budget `B`: live KV entries per (layer, KV head) left after an eviction; a multiple of the block size.
    pub budget: usize,
    /// Interval `L`: entries evicted at once (the window grows to `B + L`); a multiple of the block size, `<= B`.
    pub interval: usize,
    /// Protect the prompt: only generated tokens are evicted, prompt blocks stay immutable and shareable.
    pub protect_prompt: bool,
}

/// Shape of the paged KV cache managed by [`super::KvCacheManager`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Reuse full blocks already cached under the same token-content hash (automatic prefix caching).
    pub enable_prefix_caching: bool,
    /// Live-window eviction, or `None` for a full cache.
    pub eviction: Option<EvictionConfig>,
}

/// Most blocks a pool may have: 2^27 blocks (about 3.5 GiB of host bookkeeping) exceeds any GPU's
/// KV cache even at SGLang's one-token pages, and refusing more turns a typo into a typed error
/// instead of an out-of-memory kill.
pub const MAX_BLOCKS: usize = 1 << 27;

impl CacheConfig {
    /// Checks every rule: positive sizes, ids that fit the i32 device tables, `B` and `L` positive
    /// multiples of the block size with `L <= B`.
    pub fn validate(&self) -> Result<(), BlockError> {
        let bad = |m: String| Err(BlockError::InvalidConfig(m));
        if self.block_size == 0 {
            return bad("block_size must be positive".into());
        }
        if self.num_blocks == 0 {
            return bad("num_blocks must be positive".into());
        }
        if self.num_blocks > MAX_BLOCKS {
            return bad(format!(
                "num_blocks {} is more than {MAX_BLOCKS} (2^27; the host bookkeeping alone would take \
                 {} GiB)",
                self.num_blocks,
                self.num_blocks.saturating_mul(BlockPool::BYTES_PER_BLOCK) >> 30
            ));
        }
        let max_slots = self.num_blocks.checked_mul(self.block_size);
        if self.num_blocks > i32::MAX as usize || max_slots.is_none_or(|s| s > i64::MAX as usize) {
            return bad(format!(
                "num_blocks {} with block_size {} does not fit the i32 block tables / i64 slots",
                self.num_blocks, self.block_size
            ));
        }
        if let Some(e) = &self.eviction {
            if e.budget == 0 || e.budget % self.block_size != 0 {
                return bad(format!(
                    "eviction budget {} must be a positive multiple of block_size {}",
                    e.budget, self.block_size
                ));
            }
            if e.interval == 0 || e.interval % self.block_size != 0 {
                return bad(format!(
                    "eviction interval {} must be a positive multiple of block_size {}",
                    e.interval, self.block_size
                ));
            }
            if e.interval > e.budget {
                return bad(format!(
                    "eviction interval {} must not exceed the budget {}",
                    e.interval, e.budget
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bs: usize, b: usize, l: usize) -> CacheConfig {
        CacheConfig {
            block_size: bs,
            num_blocks: 8,
            enable_prefix_caching: true,
            eviction: Some(EvictionConfig {
                budget: b,
                interval: l,
                protect_prompt: false,
            }),
        }
    }

    #[test]
    fn validate_accepts_aligned_and_rejects_the_rest() {
        assert!(cfg(16, 64, 32).validate().is_ok());
        assert!(cfg(16, 64, 64).validate().is_ok());
        for bad in [
            cfg(16, 60, 32),
            cfg(16, 64, 24),
            cfg(16, 32, 64),
            cfg(16, 0, 16),
            cfg(0, 16, 16),
        ] {
            assert!(
                matches!(bad.validate(), Err(BlockError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
        let mut zero = cfg(16, 64, 32);
        zero.num_blocks = 0;
        assert!(zero.validate().is_err());
        let mut huge = cfg(16, 64, 32);
        huge.num_blocks = MAX_BLOCKS + 1;
        let err = huge.validate().unwrap_err();
        assert!(
            err.to_string().contains(&(MAX_BLOCKS + 1).to_string()),
            "{err}"
        );
        huge.num_blocks = MAX_BLOCKS;
        assert!(huge.validate().is_ok());
    }

    #[test]
    fn serde_round_trip() {
        let c = cfg(16, 64, 32);
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<CacheConfig>(&s).unwrap(), c);
    }
}
