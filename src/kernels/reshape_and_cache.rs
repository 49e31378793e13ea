//! CPU reference of `reshape_and_cache`: write new K/V rows into the cache slots a slot mapping names.

use super::{CacheWriteLayout, KernelError, KvCacheMut, PagedKvLayout};
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
    reshape_and_cache_into(
        layout,
        key,
        value,
        KvCacheMut::Split {
            key: key_cache,
            value: value_cache,
        },
        slot_mapping,
    )
}

/// [`reshape_and_cache`] into separate caches or one fused K|V cache (the value view starts
/// `head_dim` elements after the key view, as `compact` and decode read it).
pub fn reshape_and_cache_into<T: Element>(
    layout: &CacheWriteLayout,
    key: &[T],
    value: &[T],
    cache: KvCacheMut<'_, T>,
    slot_mapping: &[i64],
) -> Result<(), KernelError> {
    let (l, kv) = (layout, &layout.cache);
    let hd = kv.head_dim.max(0) as usize;
    let (key_cache, mut value_cache, voff) = match cache {
        KvCacheMut::Split { key, value } => (key, Some(value), 0),
        KvCacheMut::Fused(c) => (c, None, hd),
    };
    let kc_len = key_cache.len();
    let vc_len = match &value_cache {
        Some(v) => v.len(),
        None => kc_len.saturating_sub(voff),
    };
    layout.validate(key.len(), value.len(), kc_len, vc_len, slot_mapping.len())?;
    layout.validate_slots(slot_mapping)?;
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
            let vdst = match value_cache.as_deref_mut() {
                Some(v) => &mut v[dst_v..dst_v + hd],
                None => &mut key_cache[voff + dst_v..voff + dst_v + hd],
            };
            vdst.copy_from_slice(&value[src_v..src_v + hd]);
        }
    }
    Ok(())
}
