//! CPU reference of `compact`: per (sequence, KV head), move the survivors' K, V and statistics to
//! the tail of the live window in their original order, in place.

use super::paged::{per_sequence, LiveWindows, PagedKvLayout, StatsLayout};
use super::scorer_mlp::validate_slot_matrix;
use super::KernelError;
use crate::Element;

/// The K/V cache a compaction rewrites: two tensors, or one fused tensor whose value view starts
/// [`PagedKvLayout::value_offset`] elements after its key view.
#[derive(Debug)]
pub enum KvCacheMut<'a, T> {
    /// Separate key and value tensors.
    Split {
        /// Key cache.
        key: &'a mut [T],
        /// Value cache.
        value: &'a mut [T],
    },
    /// One tensor holding both views.
    Fused(&'a mut [T]),
}

/// Checks the eviction counts (`0 <= num_evict[s] <= live`, a multiple of `block_size` so the live
/// start can advance by it) against the windows.
pub fn validate_num_evict(
    seq_lens: &[i32],
    live_starts: &[i32],
    num_evict: &[i32],
    block_size: i64,
) -> Result<(), KernelError> {
    if block_size <= 0 {
        return Err(KernelError::InvalidSize {
            name: "block_size",
            value: block_size,
            why: "must be positive",
        });
    }
    per_sequence("live starts", live_starts.len(), seq_lens.len())?;
    per_sequence("eviction counts", num_evict.len(), seq_lens.len())?;
    for (s, &e) in num_evict.iter().enumerate() {
        let live = seq_lens[s] - live_starts[s];
        if e < 0 || e > live || e as i64 % block_size != 0 {
            return Err(KernelError::InvalidArgument {
                name: "num_evict",
                why: format!("sequence {s}: {e} evictions of {live} live entries (need a multiple of block_size {block_size})"),
            });
        }
    }
    Ok(())
}

/// Moves, for every sequence `s` and KV head `kh`, the `k = live - num_evict[s]` survivors listed
/// (strictly ascending live slots) at the front of row `(s * num_kv_heads + kh)` of `survivors`
/// (`[num_seqs, num_kv_heads, max_live]` int32) to live slots `num_evict[s]..live`, keeping their
/// order: K, V and, when `stats` is given, their statistics rows. Moves only go toward the tail, so
/// it runs in place (highest survivor first). The caller then advances `live_start` by
/// `num_evict[s]` and frees the blocks before it. Same contract as `fkv_compact`
/// (csrc/compact.cu), which bounds-checks survivor slots on the device but does not check order.
#[allow(clippy::too_many_arguments)]
pub fn compact<T: Element>(
    kv: &PagedKvLayout,
    windows: &LiveWindows<'_>,
    max_live: i64,
    num_evict: &[i32],
    survivors: &[i32],
    cache: KvCacheMut<'_, T>,
    stats: Option<(&StatsLayout, &mut [f32])>,
) -> Result<(), KernelError> {
    let (key_len, value_len) = match &cache {
        KvCacheMut::Split { key, value } => (key.len(), value.len()),
        KvCacheMut::Fused(c) => (c.len(), c.len().saturating_sub(kv.value_offset())),
    };
    kv.validate(key_len, value_len)?;
    windows.validate(kv.block_size, kv.num_blocks)?;
    validate_num_evict(
        windows.seq_lens,
        windows.live_starts,
        num_evict,
        kv.block_size,
    )?;
    let nkv = kv.num_kv_heads as usize;
    validate_slot_matrix(
        "survivors",
        windows.max_live(),
        max_live,
        windows.num_seqs(),
        kv.num_kv_heads,
        survivors.len(),
    )?;
    if let Some((layout, buf)) = &stats {
        layout.validate(kv, layout.group_size * kv.num_kv_heads, buf.len())?;
    }
    let ml = max_live as usize;
    for s in 0..windows.num_seqs() {
        let live = windows.live_len(s);
        let keep = live - num_evict[s] as usize;
        for kh in 0..nkv {
            let row = &survivors[(s * nkv + kh) * ml..][..keep];
            for (k, &src) in row.iter().enumerate() {
                let ok = src >= 0 && (src as usize) < live && (k == 0 || src > row[k - 1]);
                if !ok {
                    return Err(KernelError::InvalidArgument {
                        name: "survivors",
                        why: format!("sequence {s}, KV head {kh}: entry {k} = {src} is not a strictly ascending live slot below {live}"),
                    });
                }
            }
        }
    }
    let hd = kv.head_dim as usize;
    let (key, mut value, voff) = match cache {
        KvCacheMut::Split { key, value } => (key, Some(value), 0),
        KvCacheMut::Fused(c) => (c, None, kv.value_offset()),
    };
    let mut stats = stats;
    for s in 0..windows.num_seqs() {
        let live = windows.live_len(s);
        let evict = num_evict[s] as usize;
        let keep = live - evict;
        for kh in 0..nkv {
            let row = &survivors[(s * nkv + kh) * ml..][..keep];
            for (k, &src) in row.iter().enumerate().rev() {
                let dst = evict + k;
                let src = src as usize;
                if dst == src {
                    continue;
                }
                let (sb, st) = windows.slot(s, src, kv.block_size);
                let (db, dt) = windows.slot(s, dst, kv.block_size);
                let h = kh as i64;
                let ks = PagedKvLayout::offset(&kv.key_strides, sb, st, h);
                let kd = PagedKvLayout::offset(&kv.key_strides, db, dt, h);
                key.copy_within(ks..ks + hd, kd);
                let vs = PagedKvLayout::offset(&kv.value_strides, sb, st, h) + voff;
                let vd = PagedKvLayout::offset(&kv.value_strides, db, dt, h) + voff;
                match value.as_deref_mut() {
                    Some(v) => v.copy_within(vs..vs + hd, vd),
                    None => key.copy_within(vs..vs + hd, vd),
                }
                if let Some((layout, buf)) = stats.as_mut() {
                    let n = layout.row();
                    let (ss, sd) = (layout.offset(sb, st, h), layout.offset(db, dt, h));
                    buf.copy_within(ss..ss + n, sd);
                }
            }
        }
    }
    Ok(())
}
