//! The continuous-batching scheduler that drives the real [`KvCacheManager`] through a scenario:
//! admission by what a sequence will really hold (its compressed footprint under eviction) or
//! greedily by free blocks, chunked prefill under a per-step token budget, preemption by recompute
//! when blocks run out, and the eviction schedule driving compaction. Time advances by the cost
//! model's price of every step.

use super::cost::{CostModel, StepWork};
use super::error::ReplayError;
use super::metrics::{Recorder, RunMetrics};
use super::policy_cost::Policy;
use super::request_trace::TraceRequest;
use crate::block::{BlockError, CacheConfig, EvictionConfig, KvCacheManager, SeqId};
use serde::Serialize;
use std::collections::VecDeque;

/// How waiting requests are admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// Admit while the footprints all running sequences will hold at their peak fit in the pool
    /// (with eviction: the compressed footprint). Nothing is ever preempted.
    Footprint,
    /// Admit while the prompt fits in the free blocks (above a 1% watermark), as vLLM does;
    /// preempt the newest sequence by recompute when a step runs out of blocks.
    Greedy,
}

/// One run's scheduler settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerConfig {
    /// The policy; capacity-wise every evicting policy behaves the same.
    pub policy: Policy,
    /// Budget B in tokens; `None` exactly for the full cache.
    pub budget: Option<usize>,
    /// Eviction interval L in tokens.
    pub interval: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Evict only generated tokens.
    pub protect_prompt: bool,
    /// Admission rule.
    pub admission: Admission,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens (decode plus prefill chunks) per step.
    pub max_batched_tokens: usize,
    /// Stop after this much simulated time, freeing what still runs.
    pub horizon_s: Option<f64>,
}

impl SchedulerConfig {
    /// The block manager's configuration for this run.
    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            enable_prefix_caching: false,
            eviction: self.budget.map(|budget| EvictionConfig {
                budget,
                interval: self.interval,
                protect_prompt: self.protect_prompt,
            }),
        }
    }

    fn validate(&self) -> Result<(), ReplayError> {
        if self.policy.evicts() != self.budget.is_some() {
            return Err(ReplayError::Config(format!(
                "policy {} needs {} budget",
                self.policy.name(),
                if self.policy.evicts() { "a" } else { "no" }
            )));
        }
        if self.max_num_seqs == 0 || self.max_batched_tokens < self.max_num_seqs {
            return Err(ReplayError::Config(format!(
                "max batched tokens ({}) must be at least max sequences ({}) and both positive",
                self.max_batched_tokens, self.max_num_seqs
            )));
        }
        if self.horizon_s.is_some_and(|h| h.is_nan() || h <= 0.0) {
            return Err(ReplayError::Config("horizon must be positive".into()));
        }
        Ok(())
    }
}

/// One block-manager operation the scheduler issued, for export and for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// `add_sequence` with this many prompt tokens.
    Add {
        /// The sequence.
        seq: SeqId,
        /// Prompt tokens.
        tokens: usize,
    },
    /// `append` of this many tokens.
    Append {
        /// The sequence.
        seq: SeqId,
        /// Tokens appended.
        tokens: usize,
    },
    /// `compact` after a due eviction, advancing the live window to `live_start`.
    Compact {
        /// The sequence.
        seq: SeqId,
        /// The new live start.
        live_start: usize,
    },
    /// `free` of a finished (or drained) sequence.
    Free {
        /// The sequence.
        seq: SeqId,
    },
    /// `preempt` for recompute.
    Preempt {
        /// The sequence.
        seq: SeqId,
    },
}

/// What an observer sees after every step.
pub struct StepView<'a> {
    /// Simulated time at the end of the step.
    pub now: f64,
    /// The manager, to inspect.
    pub manager: &'a KvCacheManager,
    /// Blocks reserved by footprint admission (0 under greedy admission).
    pub reserved_blocks: usize,
    running: &'a [Seq],
}

/// A running sequence as observers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningSeq {
    /// The sequence.
    pub id: SeqId,
    /// Whether its prefill has been computed (its prompt compression, if any, is then done).
    pub prefilled: bool,
}

impl StepView<'_> {
    /// The running sequences, oldest admission first.
    pub fn running(&self) -> impl Iterator<Item = RunningSeq> + '_ {
        self.running.iter().map(|s| RunningSeq {
            id: s.id,
            prefilled: s.prefilled >= s.prompt_len,
        })
    }
}

/// Watches a run: every block operation and every step.
pub trait Observer {
    /// Called for each block-manager operation, after it succeeded.
    fn op(&mut self, _op: &BlockOp) -> Result<(), ReplayError> {
        Ok(())
    }
    /// Called after each step.
    fn step(&mut self, _view: &StepView<'_>) -> Result<(), ReplayError> {
        Ok(())
    }
}

/// An observer that watches nothing.
pub struct NoObserver;

impl Observer for NoObserver {}

/// A running sequence.
#[derive(Debug, Clone)]
struct Seq {
    id: SeqId,
    request: usize,
    /// Tokens in the cache (the prompt, recomputed tokens, and decoded inputs).
    len: usize,
    /// Prompt tokens computed so far; equal to `prompt_len` once prefilled.
    prefilled: usize,
    /// Tokens handed to `add_sequence`.
    prompt_len: usize,
    live_start: usize,
    /// Protected prefix (prompt rounded up to a block) in protect mode, else 0.
    protected: usize,
    footprint: usize,
}

impl Seq {
    /// KV entries attention reads: the protected prefix plus the live window.
    fn attended(&self) -> usize {
        self.len.min(self.protected) + self.len.saturating_sub(self.live_start.max(self.protected))
    }
}

/// Token id of a request's `pos`-th token: distinct across requests so no prefix is shared by chance.
fn token(request: usize, pos: usize) -> u32 {
    let mut x = ((request as u64) << 32 | pos as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) as u32
}

/// Free blocks greedy admission keeps in reserve, as a share of the pool.
const WATERMARK: f64 = 0.01;

/// Progress callback: requests finished so far.
pub type Progress<'a> = &'a (dyn Fn(usize) + Sync);

/// Replays `requests` (sorted by arrival) under `cfg`, pricing steps with `cost`.
pub fn simulate(
    requests: &[TraceRequest],
    cfg: &SchedulerConfig,
    cost: &CostModel,
    observer: &mut dyn Observer,
    progress: Option<Progress<'_>>,
) -> Result<RunMetrics, ReplayError> {
    cfg.validate()?;
    let manager = KvCacheManager::new(cfg.cache_config())?;
    let n = requests.len();
    for (i, r) in requests.iter().enumerate() {
        let (p, o) = (r.prompt_tokens as usize, r.output_tokens as usize);
        let needed = manager
            .max_blocks_held(p, p + o)
            .max(p.div_ceil(cfg.block_size));
        if needed > cfg.num_blocks {
            return Err(ReplayError::RequestTooLarge {
                request: i,
                needed,
                capacity: cfg.num_blocks,
            });
        }
    }
    let block_bytes = (cfg.block_size * cost.model().kv_bytes_per_token()) as f64;
    let mut rec = Recorder::new(
        requests.iter().map(|r| r.arrival_s).collect(),
        requests.iter().map(|r| r.output_tokens).collect(),
        block_bytes,
    );
    let mut generated = vec![0usize; n];
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut next_arrival = 0;
    let mut next_id: SeqId = 0;
    let mut reserved = 0usize;
    let mut finished = 0usize;
    let mut now = 0.0f64;
    let watermark = (WATERMARK * cfg.num_blocks as f64).ceil() as usize;
    let budget = cfg.budget.unwrap_or(0);

    loop {
        while next_arrival < n && requests[next_arrival].arrival_s <= now {
            waiting.push_back(next_arrival);
            next_arrival += 1;
        }
        if running.is_empty() && waiting.is_empty() {
            if next_arrival == n {
                break;
            }
            now = requests[next_arrival].arrival_s;
            continue;
        }
        if cfg.horizon_s.is_some_and(|h| now >= h) {
            break;
        }

        let mut tokens_left = cfg.max_batched_tokens;
        let mut work = StepWork::default();
        // (index in `running`, whether it decoded) of the sequences that computed this step.
        let mut computed: Vec<(usize, bool)> = Vec::with_capacity(running.len() + 8);
        let mut preempted_now = false;

        let mut i = 0;
        while i < running.len() && tokens_left > 0 {
            let s = &running[i];
            if s.prefilled < s.prompt_len {
                let chunk = (s.prompt_len - s.prefilled).min(tokens_left);
                add_prefill(&mut work, s.prefilled, chunk);
                running[i].prefilled += chunk;
                tokens_left -= chunk;
                computed.push((i, false));
                i += 1;
                continue;
            }
            let tok = [token(s.request, s.len)];
            let id = s.id;
            match manager.append(id, &tok) {
                Ok(_) => {
                    observer.op(&BlockOp::Append { seq: id, tokens: 1 })?;
                    let s = &mut running[i];
                    s.len += 1;
                    work.decode_seqs += 1;
                    work.decode_live_tokens += s.attended() as u64;
                    tokens_left -= 1;
                    computed.push((i, true));
                    i += 1;
                }
                Err(BlockError::OutOfBlocks { .. }) => {
                    let victim = running
                        .pop()
                        .expect("the sequence being scheduled is running");
                    manager.preempt(victim.id)?;
                    observer.op(&BlockOp::Preempt { seq: victim.id })?;
                    reserved -= victim.footprint;
                    waiting.push_front(victim.request);
                    rec.preempt();
                    preempted_now = true;
                }
                Err(e) => return Err(e.into()),
            }
        }

        while !preempted_now && tokens_left > 0 && running.len() < cfg.max_num_seqs {
            let Some(&r) = waiting.front() else { break };
            let req = &requests[r];
            let prompt_len = req.prompt_tokens as usize + generated[r];
            let max_len = req.prompt_tokens as usize + req.output_tokens as usize;
            let footprint = manager.max_blocks_held(prompt_len, max_len);
            let fits = match cfg.admission {
                Admission::Footprint => reserved + footprint <= cfg.num_blocks,
                Admission::Greedy => {
                    let reserve = if running.is_empty() { 0 } else { watermark };
                    prompt_len.div_ceil(cfg.block_size) + reserve <= manager.num_free_blocks()
                }
            };
            if !fits {
                break;
            }
            waiting.pop_front();
            let id = next_id;
            next_id += 1;
            let prompt: Vec<u32> = (0..prompt_len).map(|p| token(r, p)).collect();
            manager.add_sequence(id, &prompt)?;
            observer.op(&BlockOp::Add {
                seq: id,
                tokens: prompt_len,
            })?;
            let protected = manager.protected_len(id)?;
            if cfg.admission == Admission::Footprint {
                reserved += footprint;
            }
            let chunk = prompt_len.min(tokens_left);
            add_prefill(&mut work, 0, chunk);
            tokens_left -= chunk;
            let footprint = if cfg.admission == Admission::Footprint {
                footprint
            } else {
                0
            };
            running.push(Seq {
                id,
                request: r,
                len: prompt_len,
                prefilled: chunk,
                prompt_len,
                live_start: 0,
                protected,
                footprint,
            });
            computed.push((running.len() - 1, false));
        }

        if computed.is_empty() && !preempted_now {
            return Err(ReplayError::Stalled {
                now_s: now,
                waiting: waiting.len(),
            });
        }
        let mut evictions = 0usize;
        let mut evicted_live = 0usize;
        if cfg.policy.evicts() {
            for &(i, decoded) in &computed {
                let s = &mut running[i];
                if !decoded && s.prefilled < s.prompt_len {
                    continue;
                }
                while let Some(plan) = manager.eviction_due(s.id)? {
                    manager.compact(s.id)?;
                    observer.op(&BlockOp::Compact {
                        seq: s.id,
                        live_start: plan.live_start_after,
                    })?;
                    evicted_live = evicted_live.max(plan.len - plan.live_start_before);
                    s.live_start = plan.live_start_after;
                    evictions += 1;
                }
            }
        }
        let evict_s = cost.eviction_seconds(
            cfg.policy,
            evictions,
            evicted_live.max(budget + cfg.interval),
            budget,
            cfg.interval,
        );
        rec.evictions(evictions, evict_s);
        now += cost.step_seconds(&work) + evict_s;

        let mut done: Vec<usize> = Vec::new();
        for &(i, decoded) in &computed {
            let s = &running[i];
            if !decoded && s.prefilled < s.prompt_len {
                continue;
            }
            generated[s.request] += 1;
            rec.first_token(s.request, now);
            if generated[s.request] >= requests[s.request].output_tokens as usize {
                done.push(i);
            }
        }
        // The simulated engine performs any queued copy-on-write copies at the end of the step (their
        // cost is not modelled), which releases the references the manager held on their sources.
        manager.take_copies();
        done.sort_unstable();
        for &i in done.iter().rev() {
            let s = running.remove(i);
            manager.free(s.id)?;
            observer.op(&BlockOp::Free { seq: s.id })?;
            reserved -= s.footprint;
            rec.finish(s.request, now);
            finished += 1;
        }
        if !done.is_empty() {
            if let Some(p) = progress {
                p(finished);
            }
        }
        rec.step(
            now,
            cfg.num_blocks - manager.num_free_blocks(),
            running.len(),
        );
        observer.step(&StepView {
            now,
            manager: &manager,
            reserved_blocks: reserved,
            running: &running,
        })?;
    }

    for s in running.drain(..) {
        manager.free(s.id)?;
        observer.op(&BlockOp::Free { seq: s.id })?;
    }
    let leaked = cfg.num_blocks - manager.num_free_blocks();
    Ok(rec.summary(cfg.policy, cfg.budget, cfg.num_blocks, leaked))
}

/// Adds a prefill chunk of `chunk` tokens after `done` computed ones to the step's work.
fn add_prefill(work: &mut StepWork, done: usize, chunk: usize) {
    work.prefill_tokens += chunk as u64;
    work.prefill_context_tokens += done as u64;
    work.prefill_pairs += chunk as f64 * (done as f64 + (chunk as f64 + 1.0) / 2.0);
}
