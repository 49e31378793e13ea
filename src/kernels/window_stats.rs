//! CPU reference of `window_stats`: the causal softmax of the queries since the last eviction
//! against the live window, reduced per live entry and query head to the 8 ForesightKV statistics.

use super::paged::{
    check_strides, extent, fits, group_size, LiveWindows, PagedKvLayout, StatsLayout,
};
use super::KernelError;
use crate::Element;
use serde::{Deserialize, Serialize};

/// Index of the max over the queries since the last eviction.
pub const STAT_MAX: usize = 0;
/// Index of the min over the queries since the last eviction (queries that can see the entry).
pub const STAT_MIN: usize = 1;
/// Index of the sum over the queries since the last eviction.
pub const STAT_SUM: usize = 2;
/// Index of the sum over the last 8 queries.
pub const STAT_SUM8: usize = 3;
/// Index of the sum over the last 16 queries.
pub const STAT_SUM16: usize = 4;
/// Index of the sum over the last 32 queries.
pub const STAT_SUM32: usize = 5;
/// Index of the cumulative sum since the entry entered the cache (carried across evictions).
pub const STAT_CUMULATIVE: usize = 6;
/// Index of the 0.9-decayed cumulative sum (decayed once per query, carried across evictions).
pub const STAT_DECAYED: usize = 7;
/// Per-query decay of [`STAT_DECAYED`].
pub const DECAY: f32 = 0.9;

/// Query buffer shape and strides of a `window_stats` call.
///
/// Queries are `[num_seqs, max_queries, num_q_heads, head_dim]` with (seq, query, head) strides,
/// head_dim contiguous (RoPE applied). Sequence `s` uses rows `0..num_queries[s]`, oldest first:
/// they are the queries of the last `num_queries[s]` tokens, so row `j` is the query of logical
/// position `len - n + j` and the last `n` live slots hold those same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WindowStatsArgs {
    /// Query heads (a multiple of the KV heads).
    pub num_q_heads: i64,
    /// Rows per sequence in the query buffer.
    pub max_queries: i64,
    /// (seq, query, head) strides of the query buffer.
    pub query_strides: [i64; 3],
    /// Softmax scale (usually 1/sqrt(head_dim)).
    pub scale: f32,
}

impl WindowStatsArgs {
    /// A densely packed query buffer, scale 1/sqrt(head_dim).
    pub fn contiguous(num_q_heads: i64, max_queries: i64, head_dim: i64) -> Self {
        let s = [
            max_queries * num_q_heads * head_dim,
            num_q_heads * head_dim,
            head_dim,
        ];
        Self {
            num_q_heads,
            max_queries,
            query_strides: s,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Checks the arguments against the cache, the stats layout and the buffers; returns the group.
    #[allow(clippy::too_many_arguments)]
    pub fn validate(
        &self,
        kv: &PagedKvLayout,
        stats_layout: &StatsLayout,
        num_queries: &[i32],
        seq_lens: &[i32],
        live_starts: &[i32],
        query_len: usize,
        stats_len: usize,
    ) -> Result<i64, KernelError> {
        let g = group_size(self.num_q_heads, kv.num_kv_heads)?;
        super::paged::positive("max_queries", self.max_queries)?;
        if !self.scale.is_finite() {
            return Err(KernelError::InvalidArgument {
                name: "scale",
                why: format!("{} is not finite", self.scale),
            });
        }
        stats_layout.validate(kv, self.num_q_heads, stats_len)?;
        if num_queries.len() != seq_lens.len() {
            return Err(KernelError::ShapeMismatch(format!(
                "{} query counts for {} sequences",
                num_queries.len(),
                seq_lens.len()
            )));
        }
        for (s, &n) in num_queries.iter().enumerate() {
            let live = (seq_lens[s] - live_starts[s]) as i64;
            if n < 0 || n as i64 > self.max_queries || n as i64 > live {
                return Err(KernelError::InvalidArgument {
                    name: "num_queries",
                    why: format!(
                        "sequence {s}: {n} queries, need 0..={} (max_queries) and <= live length {live}",
                        self.max_queries
                    ),
                });
            }
        }
        let dims = [seq_lens.len() as i64, self.max_queries, self.num_q_heads];
        check_strides("queries", &self.query_strides, &dims, kv.head_dim)?;
        fits(
            "queries",
            query_len,
            extent(&self.query_strides, &dims, kv.head_dim),
        )?;
        Ok(g)
    }
}

/// Updates the statistics of every live entry of every sequence with `num_queries[s] > 0`.
///
/// With `n = num_queries[s]`, `live` live slots and `base = live - n`, query row `j` sees slots
/// `0..=base + j` (causal) and `p_j(i)` is its softmax over them (0 for slots it cannot see). For
/// each slot `i`, KV head `kh` and query head `g` of its group, the row `g * 8 ..` of the stats is
/// overwritten with: max and min of `p_j(i)` over the queries that see `i`; `sum_j p_j(i)`; the sums
/// over the last 8, 16 and 32 rows; `cumulative = old + sum`; `decayed = old * 0.9^n + d` with
/// `d` the recurrence `d <- 0.9 d + p_j(i)` over `j = 0..n`. Slots `i >= base` entered since the
/// last eviction: their old values are taken as 0 (never read). Sequences with `n = 0` are left
/// untouched. Same contract as `fkv_window_stats_*` (csrc/window_stats.cu).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub fn window_stats<T: Element>(
    kv: &PagedKvLayout,
    windows: &LiveWindows<'_>,
    args: &WindowStatsArgs,
    queries: &[T],
    num_queries: &[i32],
    key_cache: &[T],
    stats_layout: &StatsLayout,
    stats: &mut [f32],
) -> Result<(), KernelError> {
    kv.validate(key_cache.len(), key_cache.len())?;
    windows.validate(kv.block_size, kv.num_blocks)?;
    let g = args.validate(
        kv,
        stats_layout,
        num_queries,
        windows.seq_lens,
        windows.live_starts,
        queries.len(),
        stats.len(),
    )? as usize;
    let hd = kv.head_dim as usize;
    for s in 0..windows.num_seqs() {
        let n = num_queries[s] as usize;
        if n == 0 {
            continue;
        }
        let live = windows.live_len(s);
        let base = live - n;
        let keys: Vec<Vec<Vec<f32>>> = (0..kv.num_kv_heads)
            .map(|kh| {
                (0..live)
                    .map(|i| {
                        let (b, t) = windows.slot(s, i, kv.block_size);
                        let k0 = PagedKvLayout::offset(&kv.key_strides, b, t, kh);
                        key_cache[k0..k0 + hd].iter().map(|x| x.to_f32()).collect()
                    })
                    .collect()
            })
            .collect();
        for h in 0..args.num_q_heads as usize {
            let kh = h / g;
            let gi = h % g;
            // probs[j][i] for visible slots i <= base + j.
            let probs: Vec<Vec<f32>> = (0..n)
                .map(|j| {
                    let q0 = s * args.query_strides[0] as usize
                        + j * args.query_strides[1] as usize
                        + h * args.query_strides[2] as usize;
                    let q: Vec<f32> = queries[q0..q0 + hd].iter().map(|x| x.to_f32()).collect();
                    let logits: Vec<f32> = keys[kh][..=base + j]
                        .iter()
                        .map(|k| k.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>() * args.scale)
                        .collect();
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let denom: f32 = logits.iter().map(|l| (l - m).exp()).sum();
                    logits.iter().map(|l| (l - m).exp() / denom).collect()
                })
                .collect();
            for i in 0..live {
                let first = i.saturating_sub(base);
                let mut st = [0f32; 8];
                st[STAT_MAX] = f32::NEG_INFINITY;
                st[STAT_MIN] = f32::INFINITY;
                let mut decayed = 0f32;
                for (j, row) in probs.iter().enumerate() {
                    let p = if j >= first { row[i] } else { 0.0 };
                    if j >= first {
                        st[STAT_MAX] = st[STAT_MAX].max(p);
                        st[STAT_MIN] = st[STAT_MIN].min(p);
                    }
                    st[STAT_SUM] += p;
                    if j + 8 >= n {
                        st[STAT_SUM8] += p;
                    }
                    if j + 16 >= n {
                        st[STAT_SUM16] += p;
                    }
                    if j + 32 >= n {
                        st[STAT_SUM32] += p;
                    }
                    decayed = DECAY * decayed + p;
                }
                let (b, t) = windows.slot(s, i, kv.block_size);
                let o = stats_layout.offset(b, t, kh as i64) + gi * super::paged::NUM_STATS;
                let (old_cum, old_dec) = if i < base {
                    (stats[o + STAT_CUMULATIVE], stats[o + STAT_DECAYED])
                } else {
                    (0.0, 0.0)
                };
                st[STAT_CUMULATIVE] = old_cum + st[STAT_SUM];
                st[STAT_DECAYED] = old_dec * DECAY.powi(n as i32) + decayed;
                stats[o..o + 8].copy_from_slice(&st);
            }
        }
    }
    Ok(())
}
