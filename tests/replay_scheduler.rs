//! Properties of the replay scheduler over random scenarios, driving the real block manager: it never
//! over-commits blocks, every request finishes, the pool is full again at the end, and eviction never
//! lets a live window exceed B + L + one block.

use foresightkv::block::SeqId;
use foresightkv::replay::preset::{gpu, model};
use foresightkv::replay::{
    simulate, Admission, CostModel, Observer, Policy, ReplayError, SchedulerConfig, StepView,
    TraceRequest,
};
use proptest::prelude::*;

/// Checks the invariants after every step and counts what it saw.
struct Checker {
    cfg: SchedulerConfig,
    /// Longest evictable live window allowed after a step: B + L + one block.
    window_limit: usize,
    steps: usize,
    max_used: usize,
    violations: Vec<String>,
}

impl Checker {
    fn new(cfg: SchedulerConfig) -> Checker {
        let window_limit = cfg.budget.unwrap_or(0) + cfg.interval + cfg.block_size;
        Checker {
            cfg,
            window_limit,
            steps: 0,
            max_used: 0,
            violations: Vec::new(),
        }
    }
}

impl Observer for Checker {
    fn step(&mut self, v: &StepView<'_>) -> Result<(), ReplayError> {
        self.steps += 1;
        let used = self.cfg.num_blocks - v.manager.num_free_blocks();
        self.max_used = self.max_used.max(used);
        let ids: Vec<SeqId> = v.running().map(|s| s.id).collect();
        let held: usize = ids
            .iter()
            .map(|&id| v.manager.blocks_held(id).unwrap())
            .sum();
        if held != used {
            self.violations.push(format!(
                "t={}: running sequences hold {held} blocks, pool has {used} in use",
                v.now
            ));
        }
        if self.cfg.admission == Admission::Footprint
            && (v.reserved_blocks > self.cfg.num_blocks || used > v.reserved_blocks)
        {
            self.violations.push(format!(
                "t={}: reserved {} used {used} of {}",
                v.now, v.reserved_blocks, self.cfg.num_blocks
            ));
        }
        if self.cfg.budget.is_some() {
            let limit = self.window_limit;
            for s in v.running().filter(|s| s.prefilled) {
                let len = v.manager.seq_len(s.id).unwrap();
                let base = v
                    .manager
                    .live_start(s.id)
                    .unwrap()
                    .max(v.manager.protected_len(s.id).unwrap());
                if len > base && len - base > limit {
                    self.violations.push(format!(
                        "t={}: seq {} window {} > B+L+bs = {limit}",
                        v.now,
                        s.id,
                        len - base
                    ));
                }
            }
        }
        Ok(())
    }
}

fn cost() -> CostModel {
    CostModel::new(
        model("qwen3-1.7b").unwrap().clone(),
        gpu("l4").unwrap().clone(),
    )
}

fn requests_strategy() -> impl Strategy<Value = Vec<TraceRequest>> {
    proptest::collection::vec((0.0f64..2.0, 1u32..300, 1u32..400), 1..24).prop_map(|v| {
        let mut t = 0.0;
        v.into_iter()
            .map(|(gap, p, o)| {
                t += gap;
                TraceRequest {
                    arrival_s: t,
                    prompt_tokens: p,
                    output_tokens: o,
                }
            })
            .collect()
    })
}

fn config_strategy() -> impl Strategy<Value = SchedulerConfig> {
    (
        prop_oneof![Just(8usize), Just(16)],
        0usize..4,
        1usize..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0usize..200,
        1usize..16,
    )
        .prop_map(
            |(bs, b_mult, l_mult, evict, protect, greedy, extra_blocks, max_seqs)| {
                let budget = bs * 4 * (b_mult + 1);
                let interval = (bs * l_mult).min(budget);
                SchedulerConfig {
                    policy: if evict {
                        Policy::Foresight
                    } else {
                        Policy::Full
                    },
                    budget: evict.then_some(budget),
                    interval,
                    block_size: bs,
                    num_blocks: 90 + extra_blocks,
                    protect_prompt: protect,
                    admission: if greedy {
                        Admission::Greedy
                    } else {
                        Admission::Footprint
                    },
                    max_num_seqs: max_seqs,
                    max_batched_tokens: 64.max(max_seqs),
                    horizon_s: None,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(std::env::var("FORESIGHTKV_REPLAY_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96)))]

    #[test]
    fn scheduler_invariants_hold(requests in requests_strategy(), cfg in config_strategy()) {
        let mut checker = Checker::new(cfg.clone());
        let m = match simulate(&requests, &cfg, &cost(), &mut checker, None) {
            Err(ReplayError::RequestTooLarge { needed, capacity, .. }) => {
                prop_assert!(needed > capacity);
                return Ok(());
            }
            other => other.unwrap(),
        };
        prop_assert!(checker.violations.is_empty(), "{:?}", &checker.violations[..checker.violations.len().min(5)]);
        prop_assert_eq!(m.finished, requests.len(), "every request finishes");
        prop_assert_eq!(m.blocks_leaked, 0, "the pool is full again at the end");
        prop_assert_eq!(m.output_tokens, requests.iter().map(|r| u64::from(r.output_tokens)).sum::<u64>());
        prop_assert!(checker.max_used <= cfg.num_blocks);
        prop_assert!(m.max_concurrent <= cfg.max_num_seqs);
        if cfg.admission == Admission::Footprint {
            prop_assert_eq!(m.preemptions, 0, "footprint admission never needs to preempt");
        }
        if cfg.budget.is_none() {
            prop_assert_eq!(m.evictions, 0);
        }
        prop_assert!(m.ttft_p99_s >= m.ttft_p50_s && m.ttft_p50_s > 0.0);
    }
}

/// `n` requests of `prompt` prompt and `output` output tokens, all arriving at time 0.
fn burst(n: usize, prompt: u32, output: u32) -> Vec<TraceRequest> {
    let one = TraceRequest {
        arrival_s: 0.0,
        prompt_tokens: prompt,
        output_tokens: output,
    };
    vec![one; n]
}

#[test]
fn greedy_admission_preempts_by_recompute_and_still_finishes() {
    let requests: Vec<TraceRequest> = (0..12)
        .map(|i| TraceRequest {
            arrival_s: 0.01 * f64::from(i),
            prompt_tokens: 40,
            output_tokens: 300,
        })
        .collect();
    let cfg = SchedulerConfig {
        policy: Policy::Full,
        budget: None,
        interval: 32,
        block_size: 16,
        num_blocks: 64,
        protect_prompt: false,
        admission: Admission::Greedy,
        max_num_seqs: 16,
        max_batched_tokens: 256,
        horizon_s: None,
    };
    let mut checker = Checker::new(cfg.clone());
    let m = simulate(&requests, &cfg, &cost(), &mut checker, None).unwrap();
    assert!(checker.violations.is_empty(), "{:?}", checker.violations);
    assert!(
        m.preemptions > 0,
        "12 sequences of 22 blocks cannot share 64 blocks without preemption"
    );
    assert_eq!((m.finished, m.blocks_leaked), (12, 0));
    assert_eq!(checker.max_used, 64, "greedy admission fills the pool");
    let foot = SchedulerConfig {
        admission: Admission::Footprint,
        ..cfg.clone()
    };
    let f = simulate(
        &requests,
        &foot,
        &cost(),
        &mut foresightkv::replay::NoObserver,
        None,
    )
    .unwrap();
    assert_eq!(
        (f.preemptions, f.max_concurrent),
        (0, 2),
        "64 blocks / 22 per sequence = 2 at a time"
    );
}

#[test]
fn eviction_raises_concurrency_under_memory_pressure() {
    let requests: Vec<TraceRequest> = burst(40, 64, 2000);
    let full = SchedulerConfig {
        policy: Policy::Full,
        budget: None,
        interval: 64,
        block_size: 16,
        num_blocks: 1000,
        protect_prompt: false,
        admission: Admission::Footprint,
        max_num_seqs: 256,
        max_batched_tokens: 2048,
        horizon_s: None,
    };
    let evict = SchedulerConfig {
        policy: Policy::Foresight,
        budget: Some(256),
        ..full.clone()
    };
    let c = cost();
    let f = simulate(
        &requests,
        &full,
        &c,
        &mut foresightkv::replay::NoObserver,
        None,
    )
    .unwrap();
    let e = simulate(
        &requests,
        &evict,
        &c,
        &mut foresightkv::replay::NoObserver,
        None,
    )
    .unwrap();
    // Full: ceil((64 + 2000) / 16) = 129 blocks each, 1000 / 129 = 7 at a time.
    // ForesightKV at B = 256, L = 64: (256 + 64) / 16 = 20 blocks each, 1000 / 20 = 50 > 40 requests.
    assert_eq!((f.max_concurrent, e.max_concurrent), (7, 40));
    assert!(
        e.output_tokens_per_s > 3.0 * f.output_tokens_per_s,
        "{} vs {}",
        e.output_tokens_per_s,
        f.output_tokens_per_s
    );
    assert!(e.evictions > 0 && e.eviction_time_fraction > 0.0);
    assert_eq!(
        (f.blocks_leaked, e.blocks_leaked, f.finished, e.finished),
        (0, 0, 40, 40)
    );
}

#[test]
fn a_request_larger_than_the_pool_is_a_typed_error() {
    let requests = burst(1, 100, 2000);
    let cfg = SchedulerConfig {
        policy: Policy::Full,
        budget: None,
        interval: 32,
        block_size: 16,
        num_blocks: 50,
        protect_prompt: false,
        admission: Admission::Greedy,
        max_num_seqs: 8,
        max_batched_tokens: 64,
        horizon_s: None,
    };
    let r = simulate(
        &requests,
        &cfg,
        &cost(),
        &mut foresightkv::replay::NoObserver,
        None,
    );
    assert!(
        matches!(
            r,
            Err(ReplayError::RequestTooLarge {
                request: 0,
                needed: 132,
                capacity: 50
            })
        ),
        "{r:?}"
    );
    let bad = SchedulerConfig {
        policy: Policy::Foresight,
        ..cfg
    };
    assert!(matches!(
        simulate(
            &requests,
            &bad,
            &cost(),
            &mut foresightkv::replay::NoObserver,
            None
        ),
        Err(ReplayError::Config(_))
    ));
}

#[test]
fn protected_prompts_add_their_blocks_to_the_footprint() {
    let requests: Vec<TraceRequest> = burst(30, 100, 1000);
    let base = SchedulerConfig {
        policy: Policy::Foresight,
        budget: Some(128),
        interval: 32,
        block_size: 16,
        num_blocks: 200,
        protect_prompt: false,
        admission: Admission::Footprint,
        max_num_seqs: 64,
        max_batched_tokens: 4096,
        horizon_s: None,
    };
    let protect = SchedulerConfig {
        protect_prompt: true,
        ..base.clone()
    };
    // Unprotected: the window peaks at (128 + 32) / 16 = 10 blocks (the 7-block prompt is inside it):
    // 200 / 10 = 20 at a time.
    // Protected: the prompt rounded up to 112 tokens = 7 blocks stays, plus a 10-block window over the
    // generated tokens: 17 blocks, 200 / 17 = 11 at a time.
    for (cfg, batch) in [(base, 20), (protect, 11)] {
        let mut checker = Checker::new(cfg.clone());
        let m = simulate(&requests, &cfg, &cost(), &mut checker, None).unwrap();
        assert!(checker.violations.is_empty(), "{:?}", checker.violations);
        assert_eq!(
            m.max_concurrent, batch,
            "protect_prompt = {}",
            cfg.protect_prompt
        );
        assert_eq!((m.finished, m.blocks_leaked, m.preemptions), (30, 0, 0));
    }
}

#[test]
fn the_window_check_sees_real_windows() {
    // The same check with the limit at B instead of B + L + one block must flag the windows that
    // grow past B between evictions: the property above is not vacuous.
    let requests = burst(1, 10, 500);
    let cfg = SchedulerConfig {
        policy: Policy::Foresight,
        budget: Some(64),
        interval: 32,
        block_size: 16,
        num_blocks: 100,
        protect_prompt: false,
        admission: Admission::Footprint,
        max_num_seqs: 4,
        max_batched_tokens: 64,
        horizon_s: None,
    };
    let mut strict = Checker::new(cfg.clone());
    strict.window_limit = 64;
    simulate(&requests, &cfg, &cost(), &mut strict, None).unwrap();
    assert!(!strict.violations.is_empty());
    let mut exact = Checker::new(cfg.clone());
    exact.window_limit = 64 + 32 - 1;
    simulate(&requests, &cfg, &cost(), &mut exact, None).unwrap();
    assert!(
        exact.violations.is_empty(),
        "after each step the window is below B + L: {:?}",
        exact.violations
    );
}
