//! Shapes and element strides of the tensors a cache write touches, validated once for both the CPU
//! reference and the CUDA launcher.

use super::paged::{check_strides, extent, fits, PagedKvLayout, MAX_ELEMS};
use super::KernelError;
use serde::{Deserialize, Serialize};

/// Shape and strides (in elements; head_dim contiguous) of a `reshape_and_cache` call.
///
/// New rows are `[num_tokens, num_kv_heads, head_dim]` with strides (token, head); the caches are
/// the [`PagedKvLayout`] every other kernel reads (strides (block, token, head)). This covers vLLM's
/// `[num_blocks, kv_heads, block_size, head_dim]` and `[num_blocks, block_size, kv_heads, head_dim]`
/// layouts and SGLang's token pool (block_size 1) in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheWriteLayout {
    /// The cache pair written to.
    pub cache: PagedKvLayout,
    /// Rows to write.
    pub num_tokens: i64,
    /// (token, head) strides of the new keys.
    pub key_strides: [i64; 2],
    /// (token, head) strides of the new values.
    pub value_strides: [i64; 2],
}

impl CacheWriteLayout {
    /// Layout of densely packed rows and a `[num_blocks, block_size, kv_heads, head_dim]` cache pair.
    pub fn contiguous(
        num_tokens: i64,
        num_kv_heads: i64,
        head_dim: i64,
        block_size: i64,
        num_blocks: i64,
    ) -> Self {
        let row = [num_kv_heads * head_dim, head_dim];
        Self {
            cache: PagedKvLayout::contiguous(num_blocks, block_size, num_kv_heads, head_dim),
            num_tokens,
            key_strides: row,
            value_strides: row,
        }
    }

    /// Number of cache slots (num_blocks * block_size).
    pub fn capacity(&self) -> i64 {
        self.cache.num_blocks.saturating_mul(self.cache.block_size)
    }

    /// Checks sizes and strides, and that each buffer (lengths in elements) holds what they address.
    pub fn validate(
        &self,
        key_len: usize,
        value_len: usize,
        key_cache_len: usize,
        value_cache_len: usize,
        slot_mapping_len: usize,
    ) -> Result<(), KernelError> {
        if !(0..=MAX_ELEMS).contains(&self.num_tokens) {
            return Err(KernelError::InvalidSize {
                name: "num_tokens",
                value: self.num_tokens,
                why: "must be in [0, 2^40]",
            });
        }
        self.cache.validate(key_cache_len, value_cache_len)?;
        if slot_mapping_len as i64 != self.num_tokens {
            return Err(KernelError::ShapeMismatch(format!(
                "slot_mapping has {slot_mapping_len} entries for {} tokens",
                self.num_tokens
            )));
        }
        let (hd, row_dims) = (
            self.cache.head_dim,
            [self.num_tokens, self.cache.num_kv_heads],
        );
        check_strides("key", &self.key_strides, &row_dims, hd)?;
        check_strides("value", &self.value_strides, &row_dims, hd)?;
        fits("key", key_len, extent(&self.key_strides, &row_dims, hd))?;
        fits(
            "value",
            value_len,
            extent(&self.value_strides, &row_dims, hd),
        )
    }

    /// Checks every slot is a padding marker (negative) or inside the cache.
    pub fn validate_slots(&self, slot_mapping: &[i64]) -> Result<(), KernelError> {
        let capacity = self.capacity();
        match slot_mapping.iter().position(|&s| s >= capacity) {
            Some(index) => Err(KernelError::SlotOutOfRange {
                index,
                slot: slot_mapping[index],
                capacity,
            }),
            None => Ok(()),
        }
    }
}
