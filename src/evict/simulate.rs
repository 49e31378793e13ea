//! Replays a trace through one policy under a schedule, per (layer, KV head) exactly as the engine
//! would evict (statistics by `kernels::window_stats`, shared victim selection, compaction), and
//! measures what each later query loses against the full cache.

use super::golden::{GoldenPolicy, GoldenScores, Schedule};
use super::philox::SampleKey;
use super::policy::EvictionPolicy;
use super::select::{select_victims, VictimRequest};
use super::trace::{LayerTrace, Trace, TraceShape};
use super::view::EvictionView;
use super::EvictError;
use crate::kernels::{DenseRows, StatsMode, WindowStatsArgs, NUM_STATS};
use rayon::prelude::*;
use serde::Serialize;
use std::sync::Arc;

/// Fidelity sums over queries (each query head of each query after the first eviction point).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Fidelity {
    /// Sum over queries of the full-cache attention mass on the kept entries.
    pub mass_sum: f64,
    /// Sum over queries of `|o_kept - o_full| / |o_full|` (attention outputs).
    pub rel_err_sum: f64,
    /// Queries measured.
    pub queries: u64,
    /// Evictions performed, summed over (layer, KV head).
    pub evictions: u64,
}

impl Fidelity {
    /// Mean attention mass kept (1 for the full cache).
    pub fn mass(&self) -> f64 {
        if self.queries == 0 {
            1.0
        } else {
            self.mass_sum / self.queries as f64
        }
    }

    /// Mean relative error of the attention output (0 for the full cache).
    pub fn rel_err(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.rel_err_sum / self.queries as f64
        }
    }

    /// Adds another set of sums.
    pub fn merge(&mut self, o: &Fidelity) {
        self.mass_sum += o.mass_sum;
        self.rel_err_sum += o.rel_err_sum;
        self.queries += o.queries;
        self.evictions += o.evictions;
    }
}

/// One eviction of one (layer, KV head): what was eligible, how it scored, what went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvictionRecord {
    /// Layer.
    pub layer: usize,
    /// KV head.
    pub kv_head: usize,
    /// Sequence length at the eviction.
    pub seq_len: usize,
    /// Original positions of the unprotected live entries (the candidates), ascending.
    pub candidates: Vec<u32>,
    /// Their eviction scores (for Golden Eviction: minus the future score).
    pub scores: Vec<f32>,
    /// Original positions evicted, ascending.
    pub victims: Vec<u32>,
}

/// What a replay returns.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimResult {
    /// Fidelity sums over every layer and head.
    pub fidelity: Fidelity,
    /// Every eviction, when recording was asked for.
    pub records: Vec<EvictionRecord>,
}

/// Replay options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimOptions {
    /// Budget and interval.
    pub schedule: Schedule,
    /// Request id in the sampling key.
    pub request: u32,
    /// Keep an [`EvictionRecord`] of every eviction.
    pub record: bool,
    /// Statistics definition computed for the policy (must match a scorer's checkpoint).
    pub stats_mode: StatsMode,
}

impl SimOptions {
    /// Options for `schedule`: request 0, no records, the paper's statistics.
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            request: 0,
            record: false,
            stats_mode: StatsMode::Paper,
        }
    }
}

/// Replays `trace` through `policy`: tokens arrive one by one (the prompt's queries are only
/// used once prefill is over); at every eviction of the schedule each (layer, KV head) updates its
/// statistics with the queries since the last eviction (window = the last `L` of them, in
/// `opts.stats_mode`), the policy scores it and the entries above the budget go, chosen outside the
/// newest `L`. An eviction due when the trace ends (sequence length `T`) is skipped: no later query
/// could measure it, and Golden Eviction has no future to score it by. Every query from the first
/// eviction on is measured against the full cache. Layers one at a time, KV heads in parallel.
/// A policy needing another statistics mode (a scorer trained on it) is
/// [`EvictError::StatsModeMismatch`].
pub fn simulate(
    trace: &Trace,
    policy: &dyn EvictionPolicy,
    opts: &SimOptions,
) -> Result<SimResult, EvictError> {
    opts.schedule.validate()?;
    if let Some(need) = policy.stats_mode() {
        if need != opts.stats_mode {
            return Err(EvictError::StatsModeMismatch {
                checkpoint: need,
                computed: opts.stats_mode,
            });
        }
    }
    let shape = trace.shape();
    let mut out = SimResult::default();
    for l in 0..shape.num_layers {
        let layer = trace.layer(l)?;
        let heads: Vec<SimResult> = (0..shape.num_kv_heads)
            .into_par_iter()
            .map(|kh| simulate_head(&shape, &layer, l, kh, policy, opts))
            .collect::<Result<_, _>>()?;
        for h in heads {
            out.fidelity.merge(&h.fidelity);
            out.records.extend(h.records);
        }
    }
    Ok(out)
}

/// The live cache of one (layer, KV head) during a replay.
struct Live {
    keys: Vec<f32>,
    values: Vec<f32>,
    stats: Vec<f32>,
    positions: Vec<u32>,
}

/// Replay of one (layer, KV head).
fn simulate_head(
    shape: &TraceShape,
    layer: &LayerTrace,
    l: usize,
    kh: usize,
    policy: &dyn EvictionPolicy,
    opts: &SimOptions,
) -> Result<SimResult, EvictError> {
    let (d, g, scale) = (shape.head_dim, shape.group_size(), shape.scale());
    let (budget, interval) = (opts.schedule.budget, opts.schedule.interval);
    let row = g * NUM_STATS;
    let mut live = Live {
        keys: Vec::new(),
        values: Vec::new(),
        stats: Vec::new(),
        positions: Vec::new(),
    };
    let mut res = SimResult::default();
    let mut since = 0usize;
    let mut eviction = 0u32;
    let mut logits = vec![0f32; shape.len];
    for t in 0..shape.len {
        live.keys.extend_from_slice(layer.key(shape, t, kh));
        live.values.extend_from_slice(layer.value(shape, t, kh));
        live.stats.extend(std::iter::repeat_n(0f32, row));
        live.positions.push(t as u32);
        if t >= opts.schedule.anchor() {
            for gi in 0..g {
                let (mass, err) = measure(
                    shape,
                    layer,
                    kh,
                    kh * g + gi,
                    t,
                    &live.positions,
                    &mut logits,
                );
                res.fidelity.mass_sum += mass;
                res.fidelity.rel_err_sum += err;
                res.fidelity.queries += 1;
            }
        }
        let n = live.positions.len();
        if !policy.evicts() || !opts.schedule.evicts_at(t + 1) || t + 1 == shape.len {
            continue;
        }
        let m = t + 1 - since;
        let queries: Vec<f32> = (since..=t)
            .flat_map(|j| {
                (0..g).flat_map(move |gi| layer.query(shape, j, kh * g + gi).iter().copied())
            })
            .collect();
        let rows = DenseRows::new(n, d, g);
        let mut args = WindowStatsArgs::contiguous(g as i64, m as i64, d as i64)
            .with_stats(interval as i64, opts.stats_mode);
        args.scale = scale;
        rows.window_stats(&args, &queries, m as i32, &live.keys, &mut live.stats)?;
        let key = SampleKey {
            seed: 0,
            request: opts.request,
            layer: l as u32,
            head: kh as u32,
            eviction,
        };
        let view = EvictionView {
            key,
            head_dim: d,
            group_size: g,
            scale,
            seq_len: t + 1,
            keys: &live.keys,
            values: &live.values,
            stats: &live.stats,
            queries: &queries,
            positions: &live.positions,
        };
        view.validate()?;
        let mut scores = vec![0f32; n];
        policy.score(&view, &mut scores)?;
        let req = VictimRequest {
            num_protected: interval,
            num_evict: n - budget,
            key,
        };
        let victims = select_victims(&scores, &req, &policy.victim_mode())?;
        if opts.record {
            let cand = n - interval;
            res.records.push(EvictionRecord {
                layer: l,
                kv_head: kh,
                seq_len: t + 1,
                candidates: live.positions[..cand].to_vec(),
                scores: scores[..cand].to_vec(),
                victims: victims.iter().map(|&v| live.positions[v]).collect(),
            });
        }
        compact(&mut live, &victims, d, row);
        since = t + 1;
        eviction += 1;
        res.fidelity.evictions += 1;
    }
    Ok(res)
}

/// Removes the `victims` (ascending slots), keeping survivors in order.
fn compact(live: &mut Live, victims: &[usize], d: usize, row: usize) {
    let mut gone = vec![false; live.positions.len()];
    victims.iter().for_each(|&v| gone[v] = true);
    let mut w = 0;
    for (r, &dropped) in gone.iter().enumerate() {
        if dropped {
            continue;
        }
        live.keys.copy_within(r * d..(r + 1) * d, w * d);
        live.values.copy_within(r * d..(r + 1) * d, w * d);
        live.stats.copy_within(r * row..(r + 1) * row, w * row);
        live.positions[w] = live.positions[r];
        w += 1;
    }
    live.keys.truncate(w * d);
    live.values.truncate(w * d);
    live.stats.truncate(w * row);
    live.positions.truncate(w);
}

/// Mass kept and relative output error of query `t`, head `h`, attending to the `kept` positions
/// instead of all of `0..=t` (`logits` is scratch of at least `t + 1`).
fn measure(
    shape: &TraceShape,
    layer: &LayerTrace,
    kh: usize,
    h: usize,
    t: usize,
    kept: &[u32],
    logits: &mut [f32],
) -> (f64, f64) {
    let d = shape.head_dim;
    let q = layer.query(shape, t, h);
    let scale = shape.scale();
    let mut mx = f32::NEG_INFINITY;
    for (i, lg) in logits[..=t].iter_mut().enumerate() {
        *lg = crate::kernels::dot(q, layer.key(shape, i, kh)) * scale;
        mx = mx.max(*lg);
    }
    // Attention weights in f32 (each <= 1), their sums and the weighted values accumulated in f64
    // per entry would cost a scalar f64 pass over T x d; f32 accumulators are enough for a metric
    // (relative rounding ~1e-6 over a few thousand entries) and vectorise.
    let mut full = vec![0f32; d];
    let mut z_full = 0f64;
    for (i, lg) in logits[..=t].iter_mut().enumerate() {
        let e = (*lg - mx).exp();
        *lg = e;
        z_full += e as f64;
        full.iter_mut()
            .zip(layer.value(shape, i, kh))
            .for_each(|(o, v)| *o += e * *v);
    }
    let mut part = vec![0f32; d];
    let mut z_kept = 0f64;
    for &p in kept {
        let e = logits[p as usize];
        z_kept += e as f64;
        part.iter_mut()
            .zip(layer.value(shape, p as usize, kh))
            .for_each(|(o, v)| *o += e * *v);
    }
    let full: Vec<f64> = full.iter().map(|&x| x as f64).collect();
    let part: Vec<f64> = part.iter().map(|&x| x as f64).collect();
    let (mut num, mut den) = (0f64, 0f64);
    for (f, p) in full.iter().zip(&part) {
        let (f, p) = (f / z_full, p / z_kept.max(f64::MIN_POSITIVE));
        num += (p - f) * (p - f);
        den += f * f;
    }
    (z_kept / z_full, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Golden Eviction of a whole trace: the future scores and the record of every greedy eviction
/// (candidates' positions and scores, victims) of every (layer, KV head), for distillation. The
/// trajectory does not depend on the statistics (Golden Eviction never reads them).
pub fn golden_eviction(
    trace: &Trace,
    schedule: Schedule,
) -> Result<(Arc<GoldenScores>, SimResult), EvictError> {
    let scores = Arc::new(GoldenScores::compute(trace, schedule)?);
    let policy = GoldenPolicy {
        scores: scores.clone(),
    };
    let run = simulate(
        trace,
        &policy,
        &SimOptions {
            record: true,
            ..SimOptions::new(schedule)
        },
    )?;
    Ok((scores, run))
}
