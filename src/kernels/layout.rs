//! Shapes and element strides of the tensors a cache write touches, validated once for both the CPU
//! reference and the CUDA launcher.

use super::paged::{check_strides, extent, fits, MAX_ELEMS};
use super::KernelError;
use serde::{Deserialize, Serialize};

/// Shape and strides (in elements; head_dim contiguous) of a `reshape_and_cache` call.
///
/// New rows are `[num_tokens, num_kv_heads, head_dim]` with strides (token, head); the caches are
/// `num_blocks` blocks of `block_size` tokens with strides (block, token, head). This covers vLLM's
/// `[num_blocks, kv_heads, block_size, head_dim]` and `[num_blocks, block_size, kv_heads, head_dim]`
/// layouts and SGLang's token pool (block_size 1) in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheWriteLayout {
    /// Rows to write.
    pub num_tokens: i64,
    /// KV heads per row.
    pub num_kv_heads: i64,
    /// Elements per head.
    pub head_dim: i64,
    /// Tokens per cache block.
    pub block_size: i64,
    /// Blocks in each cache tensor.
    pub num_blocks: i64,
    /// (token, head) strides of the new keys.
    pub key_strides: [i64; 2],
    /// (token, head) strides of the new values.
    pub value_strides: [i64; 2],
    /// (block, token, head) strides of the key cache.
    pub key_cache_strides: [i64; 3],
    /// (block, token, head) strides of the value cache.
    pub value_cache_strides: [i64; 3],
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
        let cache = [
            block_size * num_kv_heads * head_dim,
            num_kv_heads * head_dim,
            head_dim,
        ];
        Self {
            num_tokens,
            num_kv_heads,
            head_dim,
            block_size,
            num_blocks,
            key_strides: row,
            value_strides: row,
            key_cache_strides: cache,
            value_cache_strides: cache,
        }
    }

    /// Number of cache slots (num_blocks * block_size).
    pub fn capacity(&self) -> i64 {
        self.num_blocks.saturating_mul(self.block_size)
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
        positive("num_tokens", self.num_tokens, true)?;
        positive("num_kv_heads", self.num_kv_heads, false)?;
        positive("head_dim", self.head_dim, false)?;
        positive("block_size", self.block_size, false)?;
        positive("num_blocks", self.num_blocks, false)?;
        if slot_mapping_len as i64 != self.num_tokens {
            return Err(KernelError::ShapeMismatch(format!(
                "slot_mapping has {slot_mapping_len} entries for {} tokens",
                self.num_tokens
            )));
        }
        let row_dims = [self.num_tokens, self.num_kv_heads];
        let cache_dims = [self.num_blocks, self.block_size, self.num_kv_heads];
        check_strides("key", &self.key_strides, &row_dims, self.head_dim)?;
        check_strides("value", &self.value_strides, &row_dims, self.head_dim)?;
        check_strides(
            "key_cache",
            &self.key_cache_strides,
            &cache_dims,
            self.head_dim,
        )?;
        check_strides(
            "value_cache",
            &self.value_cache_strides,
            &cache_dims,
            self.head_dim,
        )?;
        fits(
            "key",
            key_len,
            extent(&self.key_strides, &row_dims, self.head_dim),
        )?;
        fits(
            "value",
            value_len,
            extent(&self.value_strides, &row_dims, self.head_dim),
        )?;
        fits(
            "key_cache",
            key_cache_len,
            extent(&self.key_cache_strides, &cache_dims, self.head_dim),
        )?;
        fits(
            "value_cache",
            value_cache_len,
            extent(&self.value_cache_strides, &cache_dims, self.head_dim),
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

fn positive(name: &'static str, value: i64, zero_ok: bool) -> Result<(), KernelError> {
    if value < 0 || (!zero_ok && value == 0) || value > MAX_ELEMS {
        return Err(KernelError::InvalidSize {
            name,
            value,
            why: if zero_ok {
                "must be in [0, 2^40]"
            } else {
                "must be in [1, 2^40]"
            },
        });
    }
    Ok(())
}
