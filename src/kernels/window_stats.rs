//! CPU reference of `window_stats`: the causal softmax of the queries since the last eviction
//! against the live window, reduced per live entry and query head to the 8 ForesightKV statistics.
//!
//! # The statistics definition (recorded in every scorer checkpoint as its [`StatsMode`])
//!
//! One call is one eviction interval. Of its `n` query rows, the last `w = min(n, window)` form the
//! statistics *window* (`window` = the eviction interval `L`; 0 = every row); the earlier `n - w`
//! rows exist only at the first eviction (the prompt, or the first `B` tokens) and are *folded*:
//! they count toward the cumulative statistics as if seen before the last eviction, never toward
//! the windowed ones. With `p_j(i)` the causal softmax of row `j` at slot `i`, `F` = the sum over
//! the folded rows and `S` = the sum over the window rows:
//!
//! - max, min, sum: over the window rows (min over the rows that see the entry; every entry is
//!   seen by the last row);
//! - sum8, sum16, sum32: [`StatsMode::Paper`] sums over the last 8, 16 and 32 window rows (all of
//!   them if the window is shorter); [`StatsMode::Official`] all three equal `S` (the official
//!   training code, `KVCluster.update_kv`, slices `[:, :, -8:]` on the GQA axis of a
//!   `[bsz, kv_heads, G, q, k]` tensor, so for `G <= 8` it sums every query of the chunk);
//! - cumulative: `old + F + S`, carried across evictions;
//! - decayed: `0.9 * (old + F) + S`, decayed once per eviction interval (the official
//!   `cumsum_attn_decay * 0.9 + attn_weights_sum`), carried across evictions.
//!
//! Both modes share everything but the three short sums: at the first eviction over `B + L`
//! queries, the official `init_kv` sums the first `B` queries into `cumsum_attn` and
//! `cumsum_attn_decay` and `update_kv` takes max/min/sum over the `L`-query chunk, which is exactly
//! the fold above.
//!
//! # Streaming fold (bounded query buffers)
//!
//! The folded rows need not be kept until the eviction: a *fold-only* call
//! ([`WindowStatsArgs::fold_only`]) over the oldest rows since the last eviction (the rows are the
//! last of a window truncated after them) adds their probabilities, row by row in order, to a
//! running fold `F` kept in the `sum` column of each slot's statistics (dead between evictions: the
//! eviction's call overwrites it), and the eviction's call continues that same running sum with
//! its own folded rows. `folded[s]` says how many rows of sequence `s` earlier fold-only calls took
//! since the last eviction (0: the running fold starts at 0; a slot's running fold also starts at 0
//! when its own row is in the call). Because the sum is carried in f32 and continued in the same
//! row order, the result is bit for bit the one-call result over all the rows.

use super::paged::{
    check_strides, extent, fits, group_size, per_sequence, DenseRows, LiveWindows, PagedKvLayout,
    StatsLayout,
};
use super::KernelError;
use crate::Element;
use rayon::prelude::*;
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
/// Index of the 0.9-decayed cumulative sum (decayed once per eviction interval, carried across
/// evictions).
pub const STAT_DECAYED: usize = 7;
/// Per-interval decay of [`STAT_DECAYED`].
pub const DECAY: f32 = 0.9;

/// Which definition of the statistics is computed; a scorer only sees the inputs it was trained on
/// when the mode matches its checkpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum StatsMode {
    /// The paper's definitions: sum8/16/32 over the last 8/16/32 queries (the default).
    #[default]
    Paper,
    /// The official training code's features: sum8, sum16 and sum32 all equal the window sum.
    Official,
}

impl StatsMode {
    /// Name as in checkpoints and on the command line (`paper`, `official`).
    pub fn name(self) -> &'static str {
        match self {
            StatsMode::Paper => "paper",
            StatsMode::Official => "official",
        }
    }

    /// The mode of a name, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(StatsMode::Paper),
            "official" => Some(StatsMode::Official),
            _ => None,
        }
    }

    /// The `mode` value of the CUDA parameter struct (0 paper, 1 official).
    pub fn raw(self) -> i64 {
        match self {
            StatsMode::Paper => 0,
            StatsMode::Official => 1,
        }
    }
}

impl std::fmt::Display for StatsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// Rows of the statistics window: the last `min(n, window)` rows; earlier rows are folded into
    /// the cumulative statistics only (module doc). Pass the eviction interval `L`; 0 = every row.
    pub window: i64,
    /// Definition of sum8/16/32.
    pub mode: StatsMode,
    /// Every row is folded: the call only adds the rows' probabilities to the running fold kept in
    /// the `sum` column (module doc, streaming fold) and writes nothing else.
    #[serde(default)]
    pub fold_only: bool,
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
            window: 0,
            mode: StatsMode::Paper,
            fold_only: false,
        }
    }

    /// The same arguments with statistics window `window` (the eviction interval) and `mode`.
    pub fn with_stats(mut self, window: i64, mode: StatsMode) -> Self {
        self.window = window;
        self.mode = mode;
        self
    }

    /// Rows in the statistics window of a call with `n` query rows.
    pub fn window_rows(&self, n: usize) -> usize {
        if self.window > 0 {
            n.min(self.window as usize)
        } else {
            n
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
        self.validate_folded(
            kv,
            stats_layout,
            num_queries,
            None,
            seq_lens,
            live_starts,
            query_len,
            stats_len,
        )
    }

    /// [`Self::validate`] with the rows earlier fold-only calls took (`folded`, per sequence:
    /// `0 <= folded[s] <= live - num_queries[s]`, the slots before this call's rows).
    #[allow(clippy::too_many_arguments)]
    pub fn validate_folded(
        &self,
        kv: &PagedKvLayout,
        stats_layout: &StatsLayout,
        num_queries: &[i32],
        folded: Option<&[i32]>,
        seq_lens: &[i32],
        live_starts: &[i32],
        query_len: usize,
        stats_len: usize,
    ) -> Result<i64, KernelError> {
        if let Some(f) = folded {
            per_sequence("folded counts", f.len(), num_queries.len())?;
            for (s, (&fs, &n)) in f.iter().zip(num_queries).enumerate() {
                let live = seq_lens.get(s).zip(live_starts.get(s)).map(|(l, a)| l - a);
                if fs < 0 || live.is_some_and(|live| fs > live - n) {
                    return Err(KernelError::InvalidArgument {
                        name: "folded",
                        why: format!(
                            "sequence {s}: {fs} rows folded before, need 0..={} (the slots before this call's {n} rows)",
                            live.map_or(0, |l| l - n)
                        ),
                    });
                }
            }
        }
        let g = group_size(self.num_q_heads, kv.num_kv_heads)?;
        super::paged::positive("max_queries", self.max_queries)?;
        if self.window < 0 {
            return Err(KernelError::InvalidArgument {
                name: "window",
                why: format!("{} is negative (0 = every query row)", self.window),
            });
        }
        if !self.scale.is_finite() {
            return Err(KernelError::InvalidArgument {
                name: "scale",
                why: format!("{} is not finite", self.scale),
            });
        }
        stats_layout.validate(kv, self.num_q_heads, stats_len)?;
        per_sequence("query counts", num_queries.len(), seq_lens.len())?;
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
/// `0..=base + j` (causal) and `p_j(i)` is its softmax over them (0 for slots it cannot see). Rows
/// `n - w..n` (`w = args.window_rows(n)`) are the window, earlier rows are folded. For each slot
/// `i`, KV head `kh` and query head `g` of its group, the row `g * 8 ..` of the stats is
/// overwritten with the statistics of the module doc: max, min and sum of `p_j(i)` over the window
/// rows (max and min over those that see `i`); the sums over the last 8, 16 and 32 window rows
/// ([`StatsMode::Paper`]) or the window sum three times ([`StatsMode::Official`]);
/// `cumulative = old + F + S`; `decayed = 0.9 * (old + F) + S`. Slots `i >= base` entered since the
/// last eviction: their old values are taken as 0 (never read). Sequences with `n = 0` are left
/// untouched. Same contract as `fkv_window_stats_*` (csrc/window_stats.cu).
#[allow(clippy::too_many_arguments)]
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
    window_stats_folded(
        kv,
        windows,
        args,
        queries,
        num_queries,
        None,
        key_cache,
        stats_layout,
        stats,
    )
}

impl DenseRows {
    /// [`window_stats()`] of the one sequence's `num_queries` queries (f32) over the rows' `keys`,
    /// updating `stats` in the rows' statistics layout.
    pub fn window_stats(
        &self,
        args: &WindowStatsArgs,
        queries: &[f32],
        num_queries: i32,
        keys: &[f32],
        stats: &mut [f32],
    ) -> Result<(), KernelError> {
        window_stats(
            &self.kv,
            &self.windows(),
            args,
            queries,
            &[num_queries],
            keys,
            &self.stats,
            stats,
        )
    }
}

/// [`window_stats()`] continuing a streaming fold (module doc): `folded[s]` rows of sequence `s`
/// were taken by earlier fold-only calls since its last eviction (None: none). For slots before
/// this call's rows, the running fold read from the `sum` column is continued when `folded[s] > 0`;
/// the slots that entered since the last eviction are the last `n + folded[s]`. With
/// `args.fold_only`, every row is folded and only the `sum` column (the running fold) is written.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub fn window_stats_folded<T: Element>(
    kv: &PagedKvLayout,
    windows: &LiveWindows<'_>,
    args: &WindowStatsArgs,
    queries: &[T],
    num_queries: &[i32],
    folded: Option<&[i32]>,
    key_cache: &[T],
    stats_layout: &StatsLayout,
    stats: &mut [f32],
) -> Result<(), KernelError> {
    kv.validate(key_cache.len(), key_cache.len())?;
    windows.validate(kv.block_size, kv.num_blocks)?;
    let g = args.validate_folded(
        kv,
        stats_layout,
        num_queries,
        folded,
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
        let before = folded.map_or(0, |f| f[s] as usize);
        // The live keys of every KV head as f32, [H][live][hd] in one buffer.
        let mut keys = vec![0f32; kv.num_kv_heads as usize * live * hd];
        for kh in 0..kv.num_kv_heads {
            for i in 0..live {
                let (b, t) = windows.slot(s, i, kv.block_size);
                let k0 = PagedKvLayout::offset(&kv.key_strides, b, t, kh);
                let dst = (kh as usize * live + i) * hd;
                for (d, x) in keys[dst..dst + hd].iter_mut().zip(&key_cache[k0..k0 + hd]) {
                    *d = x.to_f32();
                }
            }
        }
        let stats_ro: &[f32] = stats;
        // Every query head independently (in parallel): its statistics rows, written afterwards.
        let rows: Vec<Vec<(usize, [f32; 8])>> = (0..args.num_q_heads as usize)
            .into_par_iter()
            .map(|h| {
                let kh = h / g;
                let gi = h % g;
                let head_keys = &keys[kh * live * hd..(kh + 1) * live * hd];
                let w = if args.fold_only {
                    0
                } else {
                    args.window_rows(n)
                };
                let first_window = n - w;
                // Per live slot: max, min, sum, sum8, sum16, sum32 over the window rows and the sum
                // of the rows before the window (folded); query row j sees slots 0 ..= base + j.
                let mut acc = vec![[0f32; 6]; live];
                for a in acc.iter_mut() {
                    a[STAT_MAX] = f32::NEG_INFINITY;
                    a[STAT_MIN] = f32::INFINITY;
                }
                let offs: Vec<usize> = (0..live)
                    .map(|i| {
                        let (b, t) = windows.slot(s, i, kv.block_size);
                        stats_layout.offset(b, t, kh as i64) + gi * super::paged::NUM_STATS
                    })
                    .collect();
                // The running sum continues what earlier fold-only calls left in the buffer.
                let mut fold: Vec<f32> = (0..live)
                    .map(|i| {
                        if before > 0 && i < base {
                            stats_ro[offs[i] + STAT_SUM]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mut q = vec![0f32; hd];
                let mut probs = vec![0f32; live];
                for j in 0..n {
                    let q0 = s * args.query_strides[0] as usize
                        + j * args.query_strides[1] as usize
                        + h * args.query_strides[2] as usize;
                    for (d, x) in q.iter_mut().zip(&queries[q0..q0 + hd]) {
                        *d = x.to_f32();
                    }
                    let vis = base + j + 1;
                    let row = &mut probs[..vis];
                    for (l, k) in row.iter_mut().zip(head_keys.chunks_exact(hd)) {
                        *l = super::dot(k, &q) * args.scale;
                    }
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut denom = 0f32;
                    for l in row.iter_mut() {
                        *l = (*l - m).exp();
                        denom += *l;
                    }
                    for l in row.iter_mut() {
                        *l /= denom;
                    }
                    if j < first_window {
                        for (f, &p) in fold.iter_mut().zip(row.iter()) {
                            *f += p;
                        }
                        continue;
                    }
                    let (in8, in16, in32) = (j + 8 >= n, j + 16 >= n, j + 32 >= n);
                    for (a, &p) in acc.iter_mut().zip(row.iter()) {
                        a[STAT_MAX] = a[STAT_MAX].max(p);
                        a[STAT_MIN] = a[STAT_MIN].min(p);
                        a[STAT_SUM] += p;
                        if in8 {
                            a[STAT_SUM8] += p;
                        }
                        if in16 {
                            a[STAT_SUM16] += p;
                        }
                        if in32 {
                            a[STAT_SUM32] += p;
                        }
                    }
                }
                let official = args.mode == StatsMode::Official;
                let mut out = Vec::with_capacity(live);
                for (i, &o) in offs.iter().enumerate() {
                    let folded = fold[i];
                    if args.fold_only {
                        // Only the running sum is replaced; the row's other statistics stay.
                        let mut keep = [0f32; 8];
                        keep.copy_from_slice(&stats_ro[o..o + 8]);
                        keep[STAT_SUM] = folded;
                        out.push((o, keep));
                        continue;
                    }
                    let mut st = [0f32; 8];
                    st[..6].copy_from_slice(&acc[i]);
                    if official {
                        st[STAT_SUM8] = st[STAT_SUM];
                        st[STAT_SUM16] = st[STAT_SUM];
                        st[STAT_SUM32] = st[STAT_SUM];
                    }
                    let (old_cum, old_dec) = if i + before < base {
                        (stats_ro[o + STAT_CUMULATIVE], stats_ro[o + STAT_DECAYED])
                    } else {
                        (0.0, 0.0)
                    };
                    st[STAT_CUMULATIVE] = old_cum + folded + st[STAT_SUM];
                    st[STAT_DECAYED] = DECAY * (old_dec + folded) + st[STAT_SUM];
                    out.push((o, st));
                }
                out
            })
            .collect();
        for (o, st) in rows.into_iter().flatten() {
            stats[o..o + 8].copy_from_slice(&st);
        }
    }
    Ok(())
}
