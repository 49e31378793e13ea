//! Shapes, strides and validation of the paged tensors the attention and eviction kernels read in
//! place: the K/V cache, the per-sequence live windows (block tables), and the statistics buffer.

use super::KernelError;
use crate::cuda::params;
use serde::{Deserialize, Serialize};

/// Largest number of elements any single tensor may have (2^40): rejects absurd sizes early.
pub(crate) const MAX_ELEMS: i64 = 1 << 40;

/// Number of ForesightKV statistics kept per (live entry, query head) (`FKV_NUM_STATS`).
pub const NUM_STATS: usize = params::FKV_NUM_STATS as usize;

/// Hidden width of the scorer MLP (`FKV_SCORER_HIDDEN`).
pub const SCORER_HIDDEN: usize = params::FKV_SCORER_HIDDEN as usize;

/// Head dims the CUDA attention and eviction kernels are built for (`FKV_HEAD_DIM_*`).
pub const CUDA_HEAD_DIMS: [i64; 3] = [
    params::FKV_HEAD_DIM_SMALL as i64,
    params::FKV_HEAD_DIM_MEDIUM as i64,
    params::FKV_HEAD_DIM_LARGE as i64,
];

/// Shape and element strides of a paged K/V cache pair (head_dim contiguous).
///
/// Keys and values are each `num_blocks` blocks of `block_size` tokens of `num_kv_heads` rows of
/// `head_dim` elements, addressed `block * s_block + token * s_token + head * s_head + d`. The two
/// may live in one tensor (vLLM's fused layout: the value pointer is the key pointer + head_dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedKvLayout {
    /// Blocks in the cache.
    pub num_blocks: i64,
    /// Tokens per block (16 for vLLM, 1 for SGLang's token pool).
    pub block_size: i64,
    /// KV heads.
    pub num_kv_heads: i64,
    /// Elements per head row.
    pub head_dim: i64,
    /// (block, token, head) strides of the keys.
    pub key_strides: [i64; 3],
    /// (block, token, head) strides of the values.
    pub value_strides: [i64; 3],
}

impl PagedKvLayout {
    /// Keys and values with the same (block, token, head) strides: a row of `row` elements per
    /// (block, token, head), `head_major` putting the head axis before the token axis.
    fn same_strides(
        (num_blocks, block_size, num_kv_heads, head_dim): (i64, i64, i64, i64),
        row: i64,
        head_major: bool,
    ) -> Self {
        let block = block_size * num_kv_heads * row;
        let s = if head_major {
            [block, row, block_size * row]
        } else {
            [block, num_kv_heads * row, row]
        };
        Self {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            key_strides: s,
            value_strides: s,
        }
    }

    /// A separate `[num_blocks, block_size, kv_heads, head_dim]` key tensor and value tensor.
    pub fn contiguous(num_blocks: i64, block_size: i64, num_kv_heads: i64, head_dim: i64) -> Self {
        let dims = (num_blocks, block_size, num_kv_heads, head_dim);
        Self::same_strides(dims, head_dim, false)
    }

    /// Separate `[num_blocks, kv_heads, block_size, head_dim]` tensors (vLLM's "HND" layout: the
    /// two halves of its `(2, num_blocks, ...)` cache with stride order `(0, 1, 3, 2, 4)`).
    pub fn head_major(num_blocks: i64, block_size: i64, num_kv_heads: i64, head_dim: i64) -> Self {
        let dims = (num_blocks, block_size, num_kv_heads, head_dim);
        Self::same_strides(dims, head_dim, true)
    }

    /// One `[num_blocks, block_size, kv_heads, 2 * head_dim]` tensor, K then V in the last axis;
    /// the value view starts `head_dim` elements after the key view.
    pub fn fused_token_major(
        num_blocks: i64,
        block_size: i64,
        num_kv_heads: i64,
        head_dim: i64,
    ) -> Self {
        let dims = (num_blocks, block_size, num_kv_heads, head_dim);
        Self::same_strides(dims, 2 * head_dim, false)
    }

    /// One `[num_blocks, kv_heads, block_size, 2 * head_dim]` tensor, K then V in the last axis;
    /// the value view starts `head_dim` elements after the key view (see [`Self::value_offset`]).
    pub fn fused_head_major(
        num_blocks: i64,
        block_size: i64,
        num_kv_heads: i64,
        head_dim: i64,
    ) -> Self {
        let dims = (num_blocks, block_size, num_kv_heads, head_dim);
        Self::same_strides(dims, 2 * head_dim, true)
    }

    /// Elements between the key view and the value view of a fused layout (head_dim).
    pub fn value_offset(&self) -> usize {
        self.head_dim as usize
    }

    /// Elements a buffer must hold for a view with `strides`.
    pub fn extent(&self, strides: &[i64; 3]) -> usize {
        let dims = [self.num_blocks, self.block_size, self.num_kv_heads];
        extent(strides, &dims, self.head_dim)
    }

    /// Element offset of (block, token-in-block, head) in a view with `strides`.
    pub fn offset(strides: &[i64; 3], block: i64, token: i64, head: i64) -> usize {
        (block * strides[0] + token * strides[1] + head * strides[2]) as usize
    }

    /// Checks sizes and strides, and that the key and value buffers hold what they address.
    pub fn validate(&self, key_len: usize, value_len: usize) -> Result<(), KernelError> {
        positive("num_blocks", self.num_blocks)?;
        positive("block_size", self.block_size)?;
        positive("num_kv_heads", self.num_kv_heads)?;
        positive("head_dim", self.head_dim)?;
        let dims = [self.num_blocks, self.block_size, self.num_kv_heads];
        check_strides("key_cache", &self.key_strides, &dims, self.head_dim)?;
        check_strides("value_cache", &self.value_strides, &dims, self.head_dim)?;
        fits("key_cache", key_len, self.extent(&self.key_strides))?;
        fits("value_cache", value_len, self.extent(&self.value_strides))
    }

    /// Checks the head dim is one the CUDA kernels are built for ([`CUDA_HEAD_DIMS`]).
    pub fn validate_cuda_head_dim(&self) -> Result<(), KernelError> {
        if CUDA_HEAD_DIMS.contains(&self.head_dim) {
            Ok(())
        } else {
            Err(KernelError::InvalidSize {
                name: "head_dim",
                value: self.head_dim,
                why: "the CUDA kernels support 64, 128 and 256",
            })
        }
    }
}

/// The live window `[live_start, len)` of each sequence of a batch, and the block tables that map
/// its logical positions to cache blocks.
///
/// Live slot `i` of sequence `s` is logical position `live_starts[s] + i`: block
/// `block_tables[s * block_table_stride + (live_starts[s] + i) / block_size]`, offset
/// `(live_starts[s] + i) % block_size`. `live_starts[s]` is a multiple of `block_size`.
#[derive(Debug, Clone, Copy)]
pub struct LiveWindows<'a> {
    /// `[num_seqs, block_table_stride]` block ids (int32, as vLLM keeps them).
    pub block_tables: &'a [i32],
    /// Entries per block table row (max blocks per sequence).
    pub block_table_stride: i64,
    /// Logical length of each sequence (tokens ever cached, including evicted ones).
    pub seq_lens: &'a [i32],
    /// First live logical position of each sequence.
    pub live_starts: &'a [i32],
}

impl LiveWindows<'_> {
    /// Sequences in the batch.
    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    /// Live entries of sequence `s` (`seq_lens[s] - live_starts[s]`).
    pub fn live_len(&self, s: usize) -> usize {
        (self.seq_lens[s] - self.live_starts[s]) as usize
    }

    /// Longest live window of the batch.
    pub fn max_live(&self) -> usize {
        max_live(self.seq_lens, self.live_starts)
    }

    /// (block id, offset in block) of live slot `i` of sequence `s` (validated windows only).
    pub fn slot(&self, s: usize, i: usize, block_size: i64) -> (i64, i64) {
        let pos = self.live_starts[s] as i64 + i as i64;
        let row = s as i64 * self.block_table_stride;
        (
            self.block_tables[(row + pos / block_size) as usize] as i64,
            pos % block_size,
        )
    }

    /// Checks lengths, live starts and the block table shape, without reading block ids.
    pub fn validate_lengths(&self, block_size: i64) -> Result<(), KernelError> {
        validate_window_lengths(
            self.seq_lens,
            self.live_starts,
            self.block_table_stride,
            self.block_tables.len(),
            block_size,
        )
    }

    /// Checks lengths, then every block id a live slot uses is inside a cache of `num_blocks`.
    pub fn validate(&self, block_size: i64, num_blocks: i64) -> Result<(), KernelError> {
        self.validate_lengths(block_size)?;
        for s in 0..self.num_seqs() {
            let first = self.live_starts[s] as i64 / block_size;
            let last = (self.seq_lens[s] as i64 + block_size - 1) / block_size;
            for b in first..last {
                let id = self.block_tables[(s as i64 * self.block_table_stride + b) as usize];
                if id < 0 || id as i64 >= num_blocks {
                    return Err(KernelError::BlockOutOfRange {
                        seq: s,
                        index: b as usize,
                        block: id,
                        num_blocks,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Longest live window `seq_lens[s] - live_starts[s]` of a batch (0 for none; a negative one
/// counts as 0).
pub fn max_live(seq_lens: &[i32], live_starts: &[i32]) -> usize {
    seq_lens
        .iter()
        .zip(live_starts)
        .map(|(l, s)| (l - s).max(0) as usize)
        .max()
        .unwrap_or(0)
}

/// Length checks shared by the CPU references and the CUDA launchers (which pass host mirrors of
/// `seq_lens` and `live_starts`): `0 <= live_start <= len`, `live_start % block_size == 0`, and the
/// window fits the block table row.
pub fn validate_window_lengths(
    seq_lens: &[i32],
    live_starts: &[i32],
    block_table_stride: i64,
    block_tables_len: usize,
    block_size: i64,
) -> Result<(), KernelError> {
    validate_starts(seq_lens, live_starts, block_size)?;
    if !(0..=MAX_ELEMS).contains(&block_table_stride) {
        return Err(KernelError::InvalidStride {
            name: "block_table_stride",
            value: block_table_stride,
            why: "must be in [0, 2^40]",
        });
    }
    let need = seq_lens.len() as i64 * block_table_stride;
    fits("block_tables", block_tables_len, need.max(0) as usize)?;
    for (s, &len) in seq_lens.iter().enumerate() {
        let blocks = (len as i64 + block_size - 1) / block_size;
        if blocks > block_table_stride {
            return Err(KernelError::LengthBeyondBlockTable {
                seq: s,
                len: len as i64,
                capacity: block_table_stride * block_size,
            });
        }
    }
    Ok(())
}

/// Checks a per-sequence array holds one entry per sequence: `len` `what` for `num_seqs` sequences
/// is a `ShapeMismatch` otherwise.
pub(crate) fn per_sequence(what: &str, len: usize, num_seqs: usize) -> Result<(), KernelError> {
    if len != num_seqs {
        return Err(KernelError::ShapeMismatch(format!(
            "{len} {what} for {num_seqs} sequences"
        )));
    }
    Ok(())
}

/// Checks `0 <= live_start <= len` and `live_start % block_size == 0` for every sequence.
pub fn validate_starts(
    seq_lens: &[i32],
    live_starts: &[i32],
    block_size: i64,
) -> Result<(), KernelError> {
    positive("block_size", block_size)?;
    per_sequence("live starts", live_starts.len(), seq_lens.len())?;
    for (s, (&len, &start)) in seq_lens.iter().zip(live_starts).enumerate() {
        if len < 0 || start < 0 || start > len || start as i64 % block_size != 0 {
            return Err(KernelError::BadWindow {
                seq: s,
                live_start: start as i64,
                len: len as i64,
            });
        }
    }
    Ok(())
}

/// Where the ForesightKV statistics live: an f32 buffer paged like the cache (same block ids, same
/// block size), `[num_blocks, block_size, num_kv_heads, group_size, 8]` addressed with explicit
/// (block, token, head) strides; the innermost `group_size * 8` floats are contiguous, statistic
/// `k` of query head `g` of the group at `g * 8 + k`. One buffer per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsLayout {
    /// Blocks in the buffer (at least the cache's block ids in use).
    pub num_blocks: i64,
    /// Tokens per block: the cache's block size.
    pub block_size: i64,
    /// KV heads.
    pub num_kv_heads: i64,
    /// Query heads per KV head (GQA group size G).
    pub group_size: i64,
    /// (block, token, head) strides in f32 elements.
    pub strides: [i64; 3],
}

impl StatsLayout {
    /// A densely packed `[num_blocks, block_size, kv_heads, group_size, 8]` buffer.
    pub fn contiguous(
        num_blocks: i64,
        block_size: i64,
        num_kv_heads: i64,
        group_size: i64,
    ) -> Self {
        let row = group_size * NUM_STATS as i64;
        Self {
            num_blocks,
            block_size,
            num_kv_heads,
            group_size,
            strides: [block_size * num_kv_heads * row, num_kv_heads * row, row],
        }
    }

    /// Floats per (slot, KV head): `group_size * 8`.
    pub fn row(&self) -> usize {
        self.group_size as usize * NUM_STATS
    }

    /// Element offset of the statistics row of (block, token-in-block, head).
    pub fn offset(&self, block: i64, token: i64, head: i64) -> usize {
        (block * self.strides[0] + token * self.strides[1] + head * self.strides[2]) as usize
    }

    /// Checks the layout matches the cache (block size, heads, block count) and fits `len` floats.
    pub fn validate(
        &self,
        kv: &PagedKvLayout,
        num_q_heads: i64,
        len: usize,
    ) -> Result<(), KernelError> {
        positive("stats.num_blocks", self.num_blocks)?;
        positive("stats.group_size", self.group_size)?;
        if self.block_size != kv.block_size || self.num_kv_heads != kv.num_kv_heads {
            return Err(KernelError::ShapeMismatch(format!(
                "stats layout has block_size {} and {} KV heads, the cache {} and {}",
                self.block_size, self.num_kv_heads, kv.block_size, kv.num_kv_heads
            )));
        }
        if self.num_blocks < kv.num_blocks {
            return Err(KernelError::ShapeMismatch(format!(
                "stats layout has {} blocks, the cache {}",
                self.num_blocks, kv.num_blocks
            )));
        }
        if self.group_size * kv.num_kv_heads != num_q_heads {
            return Err(KernelError::ShapeMismatch(format!(
                "stats group size {} x {} KV heads != {} query heads",
                self.group_size, kv.num_kv_heads, num_q_heads
            )));
        }
        let dims = [self.num_blocks, self.block_size, self.num_kv_heads];
        let row = self.row() as i64;
        check_strides("stats", &self.strides, &dims, row)?;
        fits("stats", len, extent(&self.strides, &dims, row))
    }
}

/// One sequence of `n` dense rows of one KV head as the paged kernels take it: block size 1,
/// block `i` holding slot `i`, so `[n, head_dim]` keys and values and `[n, group_size, 8]`
/// statistics are read in place (how the eviction layer runs a kernel over one head's live set).
#[derive(Debug, Clone)]
pub struct DenseRows {
    /// The `[n, head_dim]` cache layout.
    pub kv: PagedKvLayout,
    /// The `[n, group_size, 8]` statistics layout.
    pub stats: StatsLayout,
    table: Vec<i32>,
    seq_len: [i32; 1],
}

impl DenseRows {
    /// `n` rows of `head_dim` with statistics for `group_size` query heads.
    pub fn new(n: usize, head_dim: usize, group_size: usize) -> Self {
        let rows = n as i64;
        Self {
            kv: PagedKvLayout::contiguous(rows, 1, 1, head_dim as i64),
            stats: StatsLayout::contiguous(rows, 1, 1, group_size as i64),
            table: (0..n as i32).collect(),
            seq_len: [n as i32],
        }
    }

    /// The one window: all `n` rows live, from position 0.
    pub fn windows(&self) -> LiveWindows<'_> {
        LiveWindows {
            block_tables: &self.table,
            block_table_stride: self.table.len() as i64,
            seq_lens: &self.seq_len,
            live_starts: &[0],
        }
    }
}

/// Checks the query head count is a positive multiple of the KV head count; returns the group size.
pub fn group_size(num_q_heads: i64, num_kv_heads: i64) -> Result<i64, KernelError> {
    positive("num_q_heads", num_q_heads)?;
    positive("num_kv_heads", num_kv_heads)?;
    if num_q_heads % num_kv_heads != 0 {
        return Err(KernelError::ShapeMismatch(format!(
            "{num_q_heads} query heads is not a multiple of {num_kv_heads} KV heads"
        )));
    }
    Ok(num_q_heads / num_kv_heads)
}

/// Checks a size is in `[1, 2^40]`.
pub(crate) fn positive(name: &'static str, value: i64) -> Result<(), KernelError> {
    if value <= 0 || value > MAX_ELEMS {
        return Err(KernelError::InvalidSize {
            name,
            value,
            why: "must be in [1, 2^40]",
        });
    }
    Ok(())
}

/// Checks strides are non-negative and rows of `row` elements do not overlap along any axis of
/// extent > 1 (a zero stride broadcasts and is allowed only for reads; writers check separately).
pub(crate) fn check_strides(
    name: &'static str,
    strides: &[i64],
    dims: &[i64],
    row: i64,
) -> Result<(), KernelError> {
    for (&s, &d) in strides.iter().zip(dims) {
        if !(0..=MAX_ELEMS).contains(&s) {
            return Err(KernelError::InvalidStride {
                name,
                value: s,
                why: "must be in [0, 2^40]",
            });
        }
        if d > 1 && s < row && s != 0 {
            return Err(KernelError::InvalidStride {
                name,
                value: s,
                why: "rows would overlap",
            });
        }
    }
    Ok(())
}

/// One past the largest element offset addressed (0 when any dimension is empty).
pub(crate) fn extent(strides: &[i64], dims: &[i64], row: i64) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    // Sizes and strides are each at most 2^40, but their products may not fit: compute in i128 and
    // saturate, so an absurd layout fails the size check instead of wrapping past it.
    let last: i128 = strides
        .iter()
        .zip(dims)
        .map(|(&s, &d)| s as i128 * (d as i128 - 1))
        .sum();
    usize::try_from(last + row as i128).unwrap_or(usize::MAX)
}

/// Checks a buffer of `have` elements holds `need`.
pub(crate) fn fits(name: &'static str, have: usize, need: usize) -> Result<(), KernelError> {
    if have < need {
        return Err(KernelError::BufferTooSmall { name, have, need });
    }
    Ok(())
}
