//! Golden Eviction, the offline teacher: from a trace's full-cache attention, each token's future
//! score at an eviction is its largest block score over the rest of the trace, where a block score
//! is the attention averaged over one `L`-query block and the GQA group; at every eviction the `L`
//! lowest-scoring unprotected entries go.
//!
//! Memory stays bounded: blocks are computed a few at a time (one `T`-vector per block in flight,
//! never a `T x T` matrix) from the last block to the first, and each token keeps only the blocks
//! where its suffix maximum changes (its record values), enough to answer "max over blocks `>= e`"
//! for every eviction `e`. Blocks are computed in parallel with rayon.
//!
//! Decisions (matching the official `build_oracle_targets` / `collect_eviction_schedule` of
//! RUCAIBox/ForesightKV `supervised_training/train.py`):
//! - A block's score is the attention summed over its queries and the group's heads divided by
//!   `L * G`, also for a partial last block: the official code pads the query axis with zero rows
//!   to a multiple of `L` and takes the mean, so a block with `q < L` queries weighs `q / L` of a
//!   full one (a token needed by one last query is not as important as one needed by `L`).
//! - No eviction happens at sequence length `T` (the end of the trace): the official schedule stops
//!   while the cache still has a future block, and an eviction with no later query has nothing to
//!   score by (every future would be 0). `simulate` skips it for every policy.

use super::policy::{check_scores, EvictionPolicy};
use super::trace::{LayerTrace, Trace, TraceShape};
use super::view::{softmax_into, EvictionView};
use super::EvictError;
use rayon::prelude::*;

/// The eviction schedule: budget `B`, interval `L` and prompt length `P`. A prompt longer than `B`
/// is compressed to `B` right after prefill (at sequence length `P`); otherwise the first eviction
/// is when the cache reaches `B + L`. Later evictions follow every `L` tokens, each back to `B`
/// entries; the newest `L` entries are always protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Entries kept per (layer, KV head) after an eviction.
    pub budget: usize,
    /// Tokens between evictions, and the newest entries protected.
    pub interval: usize,
    /// Prompt tokens, prefilled at once (0: everything is decoded).
    #[serde(default)]
    pub prompt_len: usize,
}

impl Schedule {
    /// A schedule without a prompt.
    pub fn new(budget: usize, interval: usize) -> Self {
        Self {
            budget,
            interval,
            prompt_len: 0,
        }
    }

    /// Checks `budget >= interval >= 1` (the protected window must fit in the kept set).
    pub fn validate(&self) -> Result<(), EvictError> {
        if self.interval == 0 || self.budget < self.interval {
            return Err(EvictError::arg(
                "schedule",
                format!(
                    "need budget >= interval >= 1, got budget {} interval {}",
                    self.budget, self.interval
                ),
            ));
        }
        Ok(())
    }

    /// Sequence length of the first eviction (`P` if `P > B`, else `B + L`); evictions happen at
    /// `anchor + e L` and query block `k` is `[anchor + k L, anchor + (k + 1) L)`.
    pub fn anchor(&self) -> usize {
        if self.prompt_len > self.budget {
            self.prompt_len
        } else {
            self.budget + self.interval
        }
    }

    /// Whether an eviction happens once the sequence reaches `seq_len` tokens.
    pub fn evicts_at(&self, seq_len: usize) -> bool {
        seq_len >= self.anchor() && (seq_len - self.anchor()).is_multiple_of(self.interval)
    }

    /// First query block entirely in the future of an eviction at sequence length `seq_len`.
    pub fn first_future_block(&self, seq_len: usize) -> usize {
        seq_len
            .saturating_sub(self.anchor())
            .div_ceil(self.interval)
    }
}

/// Future scores of every token of every (layer, KV head) of a trace, stored as suffix-max records.
#[derive(Debug, Clone)]
pub struct GoldenScores {
    schedule: Schedule,
    num_kv_heads: usize,
    heads: Vec<HeadRecords>,
}

/// One (layer, KV head): token `i`'s records are `recs[offsets[i]..offsets[i + 1]]`, pairs
/// (block, value) in decreasing block order with increasing values.
#[derive(Debug, Clone, Default)]
struct HeadRecords {
    offsets: Vec<usize>,
    recs: Vec<(u32, f32)>,
}

impl HeadRecords {
    /// Max of token `i`'s block scores over blocks `>= block` (0 when there are none).
    fn future(&self, i: usize, block: usize) -> f32 {
        if i + 1 >= self.offsets.len() {
            return 0.0;
        }
        let r = &self.recs[self.offsets[i]..self.offsets[i + 1]];
        let k = r.partition_point(|&(b, _)| b as usize >= block);
        if k == 0 {
            0.0
        } else {
            r[k - 1].1
        }
    }
}

/// Block scores of query block `k` of one KV head: `out[i]` = the full-cache causal softmax
/// `p_j(i)` summed over the block's queries `j` and the group's heads, divided by `L * G` (a
/// partial last block is divided by `L` too), for `i` below the block's end.
pub fn block_scores(
    shape: &TraceShape,
    layer: &LayerTrace,
    keys: &[f32],
    kv_head: usize,
    schedule: &Schedule,
    block: usize,
) -> Vec<f32> {
    let (d, g) = (shape.head_dim, shape.group_size());
    let start = schedule.anchor() + block * schedule.interval;
    let end = (start + schedule.interval).min(shape.len);
    let mut out = vec![0f32; end];
    let mut p = vec![0f32; end];
    for j in start..end {
        for gi in 0..g {
            let q = layer.query(shape, j, kv_head * g + gi);
            softmax_into(q, &keys[..(j + 1) * d], d, shape.scale(), &mut p[..j + 1]);
            out[..j + 1].iter_mut().zip(&p).for_each(|(o, x)| *o += x);
        }
    }
    let norm = (schedule.interval * g) as f32;
    out.iter_mut().for_each(|o| *o /= norm);
    out
}

impl GoldenScores {
    /// Computes the future scores of `trace` under `schedule` (all cores, bounded memory).
    pub fn compute(trace: &Trace, schedule: Schedule) -> Result<Self, EvictError> {
        schedule.validate()?;
        let shape = trace.shape();
        let num_blocks = shape
            .len
            .saturating_sub(schedule.anchor())
            .div_ceil(schedule.interval);
        let chunk = 2 * rayon::current_num_threads().max(1);
        let mut heads = Vec::with_capacity(shape.num_layers * shape.num_kv_heads);
        for l in 0..shape.num_layers {
            let layer = trace.layer(l)?;
            for kh in 0..shape.num_kv_heads {
                let keys = layer.head_keys(&shape, kh);
                let mut best = vec![f32::NEG_INFINITY; shape.len];
                let mut per_token: Vec<Vec<(u32, f32)>> = vec![Vec::new(); shape.len];
                let mut hi = num_blocks;
                while hi > 0 {
                    let lo = hi.saturating_sub(chunk);
                    let blocks: Vec<Vec<f32>> = (lo..hi)
                        .into_par_iter()
                        .map(|b| block_scores(&shape, &layer, &keys, kh, &schedule, b))
                        .collect();
                    for (b, scores) in (lo..hi).zip(blocks).rev() {
                        for (i, &v) in scores.iter().enumerate() {
                            if v > best[i] {
                                best[i] = v;
                                per_token[i].push((b as u32, v));
                            }
                        }
                    }
                    hi = lo;
                }
                let mut rec = HeadRecords {
                    offsets: Vec::with_capacity(shape.len + 1),
                    recs: Vec::new(),
                };
                rec.offsets.push(0);
                for r in per_token {
                    rec.recs.extend(r);
                    rec.offsets.push(rec.recs.len());
                }
                heads.push(rec);
            }
        }
        Ok(Self {
            schedule,
            num_kv_heads: shape.num_kv_heads,
            heads,
        })
    }

    /// The schedule these scores were computed for.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Future score of token `pos` of (layer, KV head) at an eviction at sequence length `seq_len`:
    /// its max block score over the blocks after the eviction (0 if none).
    pub fn future(&self, layer: usize, kv_head: usize, pos: usize, seq_len: usize) -> f32 {
        let h = layer * self.num_kv_heads + kv_head;
        match self.heads.get(h) {
            Some(r) => r.future(pos, self.schedule.first_future_block(seq_len)),
            None => 0.0,
        }
    }

    /// Bytes held by the records (the memory bound actually used).
    pub fn record_bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|h| h.recs.len() * 8 + h.offsets.len() * 8)
            .sum()
    }
}

/// Brute-force reference of [`GoldenScores::future`] for small traces: materialises the full
/// `[G, T, T]` attention of one (layer, KV head) and takes the block max directly (blocks divided
/// by `L * G`, partial or not). Returns `out[e][i]`, the future score of token `i` at eviction `e`
/// (sequence length `anchor + e L`), for every eviction before the end of the trace.
pub fn brute_force_future(
    trace: &Trace,
    schedule: Schedule,
    layer: usize,
    kv_head: usize,
) -> Result<Vec<Vec<f32>>, EvictError> {
    schedule.validate()?;
    let s = trace.shape();
    let lt = trace.layer(layer)?;
    let (t, d, g) = (s.len, s.head_dim, s.group_size());
    let keys = lt.head_keys(&s, kv_head);
    let mut p = vec![vec![vec![0f32; t]; t]; g];
    for (gi, pg) in p.iter_mut().enumerate() {
        for (j, row) in pg.iter_mut().enumerate() {
            softmax_into(
                lt.query(&s, j, kv_head * g + gi),
                &keys[..(j + 1) * d],
                d,
                s.scale(),
                &mut row[..j + 1],
            );
        }
    }
    let (a, l) = (schedule.anchor(), schedule.interval);
    let mut out = Vec::new();
    let mut seq_len = a;
    while seq_len < t {
        let mut f = vec![0f32; seq_len];
        let mut start = seq_len;
        while start < t {
            let end = (start + l).min(t);
            for (i, fi) in f.iter_mut().enumerate() {
                let mut sum = 0f32;
                for pg in &p {
                    for row in &pg[start..end] {
                        sum += row[i];
                    }
                }
                *fi = fi.max(sum / (l * g) as f32);
            }
            start = end;
        }
        out.push(f);
        seq_len += l;
    }
    Ok(out)
}

/// Golden Eviction as a policy: eviction score = minus the future score, chosen top-`L` (the
/// greedy removal of the `L` lowest). Needs the trace's future, so it is an offline reference only.
#[derive(Debug, Clone)]
pub struct GoldenPolicy {
    /// The precomputed future scores.
    pub scores: std::sync::Arc<GoldenScores>,
}

impl EvictionPolicy for GoldenPolicy {
    fn name(&self) -> String {
        "golden".into()
    }
    fn score(&self, view: &EvictionView<'_>, scores: &mut [f32]) -> Result<(), EvictError> {
        check_scores(view, scores)?;
        let (l, h) = (view.key.layer as usize, view.key.head as usize);
        for (s, &p) in scores.iter_mut().zip(view.positions) {
            *s = -self.scores.future(l, h, p as usize, view.seq_len);
        }
        Ok(())
    }
}
