//! CPU reference of `reshape_and_cache`: write new K/V rows into the cache slots a slot mapping names.

use super::{CacheWriteLayout, KernelError, PagedKvLayout};
use crate::Element;

/// Writes token `i`'s K/V rows to slot `slot_mapping[i]` (block `slot / block_size`, offset
/// `slot % block_size`) of each cache; negative slots are padding and skipped.
///
/// Same contract as `fkv_reshape_and_cache` in csrc/reshape_and_cache.cu; every argument is
/// validated before any write.
pub fn reshape_and_cache<T: Element>(
    layout: &CacheWriteLayout,
    key: &[T],
    value: &[T],
    key_cache: &mut [T],
    value_cache: &mut [T],
    slot_mapping: &[i64],
) -> Result<(), KernelError> {
    layout.validate(
        key.len(),
        value.len(),
        key_cache.len(),
        value_cache.len(),
        slot_mapping.len(),
    )?;
    layout.validate_slots(slot_mapping)?;
    let (l, kv) = (layout, &layout.cache);
    let hd = kv.head_dim as usize;
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let (block, offset) = (slot / kv.block_size, slot % kv.block_size);
        for h in 0..kv.num_kv_heads {
            let t = t as i64;
            let src_k = (t * l.key_strides[0] + h * l.key_strides[1]) as usize;
            let src_v = (t * l.value_strides[0] + h * l.value_strides[1]) as usize;
            let dst_k = PagedKvLayout::offset(&kv.key_strides, block, offset, h);
            let dst_v = PagedKvLayout::offset(&kv.value_strides, block, offset, h);
            key_cache[dst_k..dst_k + hd].copy_from_slice(&key[src_k..src_k + hd]);
            value_cache[dst_v..dst_v + hd].copy_from_slice(&value[src_v..src_v + hd]);
        }
    }
    Ok(())
}
