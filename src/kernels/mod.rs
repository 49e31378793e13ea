//! CPU references of every kernel: the same contract as the CUDA kernels in csrc/, so everything
//! runs (and is tested) without a GPU, and the CUDA kernels are checked against these.
//!
//! # Data contracts of the eviction kernels (all per layer, on paged tensors in place)
//!
//! - Cache: [`PagedKvLayout`], K and V with explicit (block, token, head) strides, head_dim
//!   contiguous; covers `[num_blocks, block_size, kv_heads, head_dim]` pairs, SGLang's token pool
//!   (block_size 1) and a fused `[num_blocks, kv_heads, block_size, 2 * head_dim]` tensor.
//! - Windows: [`LiveWindows`], int32 block tables `[num_seqs, stride]`, `seq_lens`, `live_starts`
//!   (multiples of block_size); live slot `i` is logical position `live_start + i`.
//! - Statistics: [`StatsLayout`], an f32 buffer paged exactly like the cache (same block ids),
//!   `[num_blocks, block_size, kv_heads, G, 8]`, the 8 statistics of each (entry, query head) in
//!   the order of [`window_stats::STAT_MAX`] .. [`window_stats::STAT_DECAYED`]. Compaction moves a
//!   survivor's row with its K and V, so statistics always sit beside their entry.
//! - Per-slot matrices (scores f32, survivors int32): dense `[num_seqs, kv_heads, max_live]`.
//! - An eviction step: [`window_stats()`] (queries since the last eviction, causal; window the
//!   last `L` of them, in a [`StatsMode`]) ->
//!   [`scorer_mlp`] -> [`select_survivors`] (or a policy's own choice) -> [`compact()`], then the
//!   block manager advances `live_start` by the eviction count and frees the blocks before it.

pub mod compact;
pub mod error;
pub mod layout;
pub mod paged;
pub mod paged_attention_decode;
pub mod reshape_and_cache;
pub mod sample_survivors;
pub mod scorer_mlp;
pub mod select_survivors;
pub mod window_stats;

pub use compact::{compact, KvCacheMut};
pub use error::KernelError;
pub use layout::CacheWriteLayout;
pub use paged::{
    DenseRows, LiveWindows, PagedKvLayout, StatsLayout, CUDA_HEAD_DIMS, NUM_STATS, SCORER_HIDDEN,
};
pub use paged_attention_decode::{paged_attention_decode, DecodeArgs};
pub use reshape_and_cache::{reshape_and_cache, reshape_and_cache_into};
pub use sample_survivors::{sample_survivors, SampleArgs};
pub use scorer_mlp::{gelu, scorer_mlp, ScorerWeights};
pub use select_survivors::{score_key, select_survivors, SelectArgs};
pub use window_stats::{window_stats, window_stats_folded, StatsMode, WindowStatsArgs};

/// Dot product of two equal-length f32 slices with eight independent partial sums (so the compiler
/// vectorises it), the inner product the CPU references use for attention logits.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
