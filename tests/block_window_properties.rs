//! Property tests of the batched window planner (`block::WindowPlanner`) over random engine step
//! sequences: several requests with random prompts, prefilled in random chunks and then decoded,
//! batched together, with resets (recomputation after preemption, as one row or split at the prompt
//! the way the vLLM plugin sends it), releases, rejected batches, protect mode on and off, policies
//! that evict and one that does not, prompt lengths known or not.
//!
//! A small model written from the rules as the design states them (not from the planner's code)
//! predicts every row; after every step the plan must equal it, and the invariants must hold:
//! block-aligned windows, evictions that leave at least `B` and fewer than `B + block_size` live
//! entries, the window never past `B + L` after a commit (plus the largest chunk), attention reading
//! exactly the live entries in kernel coordinates, query offsets as prefix sums, every eviction
//! committed exactly one step later, and the released ranges of a request tiling
//! `[protected_len, live_start)` without overlap. Cases: FORESIGHTKV_PROPTEST_CASES.

mod common;

use std::collections::HashMap;

use foresightkv::block::{
    Advance, EvictionConfig, Schedule, StepPlan, StepRequest, WindowError, WindowPlanner,
};
use proptest::prelude::*;

const KEYS: u64 = 6;
const MAX_CHUNK: usize = 40;

/// What the driver does with one request in one step.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Next prefill chunk of at most `n` tokens, or one decode token once prefilled.
    Advance(usize),
    /// The engine forgets the request (finished or preempted).
    Release,
    /// Recomputation from scratch: the whole sequence again as one prefill row.
    Recompute,
    /// Recomputation split at the prompt: a prompt row (reset) then a generated row, same key.
    RecomputeSplit,
    /// A brand-new request with a prompt of `n` tokens under this key.
    Restart(usize),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        12 => (1..=MAX_CHUNK).prop_map(Act::Advance),
        1 => Just(Act::Release),
        1 => Just(Act::Recompute),
        1 => Just(Act::RecomputeSplit),
        1 => (1..120usize).prop_map(Act::Restart),
    ]
}

#[derive(Clone, Debug)]
struct Step {
    acts: Vec<(u64, Act)>,
    /// Add a row the planner must refuse (the whole batch is then retried without it).
    poison: Option<u8>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop::collection::vec((0..KEYS, act()), 0..6),
        prop::option::weighted(0.05, 0..3u8),
    )
        .prop_map(|(acts, poison)| Step { acts, poison })
}

/// The driver's view of a request: its prompt and the tokens computed so far.
#[derive(Clone, Copy, Debug)]
struct Req {
    prompt: usize,
    done: usize,
}

/// The model of one request's planner state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelState {
    serial: u64,
    len: usize,
    live_start: usize,
    protected: usize,
    pending: Option<usize>,
    /// The whole prompt's length, once a row gave it.
    prompt: Option<usize>,
}

struct Model {
    budget: usize,
    interval: usize,
    bs: usize,
    protect: bool,
    evicts: bool,
    states: HashMap<u64, ModelState>,
    /// Keys with a pending eviction, in the order they were planned.
    order: Vec<u64>,
    serial: u64,
}

/// What the model predicts for one row.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    seq_len: i32,
    live_start: i32,
    protected: i32,
    target: i32,
    serial: i64,
}

fn up(x: usize, bs: usize) -> usize {
    x.div_ceil(bs) * bs
}

impl Model {
    /// The rules, as DESIGN.md states them: commit last step's targets; per row, a reset or an
    /// unknown key starts a fresh state; prompt rows extend the protected prefix in protect mode;
    /// nothing is due while the known prompt is not complete; due when the evictable window
    /// `[max(live, protected), len)` holds `B + L`, or (outside protect mode) when the row reaches
    /// the end of the known prompt, or, the prompt unknown, when a prompt chunk of more than one
    /// token ends; the target is `len - B` rounded down to a block, and only a target beyond the
    /// window start is an eviction.
    fn step(&mut self, rows: &[StepRequest]) -> (Vec<Advance>, Vec<Row>, Vec<u64>) {
        let mut released = Vec::new();
        for key in std::mem::take(&mut self.order) {
            if let Some(s) = self.states.get_mut(&key) {
                if let Some(to) = s.pending.take() {
                    released.push(Advance {
                        key,
                        old_live_start: s.live_start,
                        new_live_start: to,
                        protected_len: s.protected,
                    });
                    s.live_start = to;
                }
            }
        }
        let mut out = Vec::new();
        let mut dropped = Vec::new();
        for r in rows {
            let fresh = ModelState {
                serial: self.serial,
                len: 0,
                live_start: 0,
                protected: 0,
                pending: None,
                prompt: None,
            };
            let s = match self.states.get(&r.key) {
                Some(old) if r.reset => {
                    dropped.push(old.serial);
                    self.serial += 1;
                    fresh
                }
                Some(old) => *old,
                None => {
                    self.serial += 1;
                    fresh
                }
            };
            let mut s = s;
            if r.prompt_len.is_some() {
                s.prompt = r.prompt_len;
            }
            if self.protect && r.prefill && r.num_new > 0 {
                let prompt = s.prompt.unwrap_or(r.seq_len).min(r.seq_len);
                s.protected = s.protected.max(up(prompt, self.bs));
            }
            s.len = r.seq_len;
            let start = s.live_start.max(s.protected);
            let prefilling = s.prompt.is_some_and(|p| s.len < p);
            let full = s.len >= start + self.budget + self.interval;
            let compress = !self.protect
                && match s.prompt {
                    Some(p) => r.seq_len - r.num_new < p && p <= r.seq_len,
                    None => r.prefill && r.num_new > 1,
                };
            let target = if s.len >= self.budget {
                (s.len - self.budget) / self.bs * self.bs
            } else {
                0
            };
            s.pending = (self.evicts
                && !prefilling
                && s.len > start
                && (full || compress)
                && target > start)
                .then_some(target);
            if s.pending.is_some() {
                self.order.push(r.key);
            }
            self.states.insert(r.key, s);
            out.push(Row {
                seq_len: s.len as i32,
                live_start: s.live_start as i32,
                protected: s.protected as i32,
                target: s.pending.map_or(-1, |t| t as i32),
                serial: s.serial as i64,
            });
        }
        (released, out, dropped)
    }
}

fn row(key: u64, seq_len: usize, num_new: usize, prefill: bool, reset: bool) -> StepRequest {
    StepRequest {
        key,
        seq_len,
        num_new,
        prefill,
        reset,
        prompt_len: None,
    }
}

/// The rows of one step from the driver's requests (updating them).
fn rows_of(
    st: &Step,
    reqs: &mut HashMap<u64, Req>,
    planner: &mut WindowPlanner,
    model: &mut Model,
) -> Vec<StepRequest> {
    let mut rows = Vec::new();
    let mut seen = Vec::new();
    for &(key, act) in &st.acts {
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        match act {
            Act::Release => {
                reqs.remove(&key);
                let serial = planner.release(key);
                let m = model.states.remove(&key).map(|s| s.serial);
                assert_eq!(serial, m, "release of {key}");
            }
            Act::Restart(prompt) => {
                reqs.insert(key, Req { prompt, done: 0 });
                let n = prompt.min(MAX_CHUNK);
                rows.push(StepRequest {
                    prompt_len: Some(prompt),
                    ..row(key, n, n, true, true)
                });
                reqs.get_mut(&key).unwrap().done = n;
            }
            Act::Advance(chunk) => {
                let Some(r) = reqs.get_mut(&key) else {
                    let prompt = chunk * 3;
                    reqs.insert(
                        key,
                        Req {
                            prompt,
                            done: chunk,
                        },
                    );
                    rows.push(StepRequest {
                        prompt_len: Some(prompt),
                        ..row(key, chunk, chunk, true, true)
                    });
                    continue;
                };
                if r.done < r.prompt {
                    let n = chunk.min(r.prompt - r.done);
                    rows.push(StepRequest {
                        prompt_len: Some(r.prompt),
                        ..row(key, r.done + n, n, true, r.done == 0)
                    });
                    r.done += n;
                } else {
                    rows.push(row(key, r.done + 1, 1, false, false));
                    r.done += 1;
                }
            }
            Act::Recompute => {
                if let Some(r) = reqs.get_mut(&key) {
                    if r.done > 0 {
                        rows.push(StepRequest {
                            prompt_len: Some(r.prompt),
                            ..row(key, r.done, r.done, true, true)
                        });
                    }
                }
            }
            Act::RecomputeSplit => {
                if let Some(r) = reqs.get_mut(&key) {
                    if r.done > r.prompt {
                        rows.push(row(key, r.prompt, r.prompt, true, true));
                        rows.push(row(key, r.done, r.done - r.prompt, false, false));
                    }
                }
            }
        }
    }
    rows
}

fn poisoned(rows: &[StepRequest], kind: u8, planner: &WindowPlanner) -> Vec<StepRequest> {
    let mut bad = rows.to_vec();
    match kind {
        0 => bad.push(row(KEYS + 1, 3, 5, true, true)),
        1 => bad.push(row(1 << 63, 3, 3, true, true)),
        _ => {
            // New tokens before a committed window (a recomputation without reset).
            let st = planner.keys().find_map(|k| {
                planner
                    .state(k)
                    .map(|s| (k, s.pending.unwrap_or(s.window.live_start), s.window.len))
            });
            match st {
                Some((k, ls, len)) if ls > 0 && !rows.iter().any(|r| r.key == k) => {
                    bad.push(row(k, len + 1, len + 1 - ls + 1, false, false))
                }
                _ => bad.push(row(KEYS + 2, 0, 1, false, false)),
            }
        }
    }
    bad
}

#[allow(clippy::too_many_arguments)]
fn check_invariants(
    model: &Model,
    rows: &[StepRequest],
    plan: &StepPlan,
    expected: &[Row],
    released: &[Advance],
    dropped: &[u64],
    freed: &mut HashMap<u64, Vec<(usize, usize)>>,
    serial_of: &HashMap<u64, u64>,
) -> Result<(), TestCaseError> {
    let (b, l, bs) = (model.budget, model.interval, model.bs);
    prop_assert_eq!(&plan.released, &released.to_vec());
    prop_assert_eq!(&plan.dropped, &dropped.to_vec());
    prop_assert_eq!(plan.len(), rows.len());
    let mut offset = 0;
    for (i, (r, want)) in rows.iter().zip(expected).enumerate() {
        let got = Row {
            seq_len: plan.seq_lens[i],
            live_start: plan.live_starts[i],
            protected: plan.protected_lens[i],
            target: plan.evict_to[i],
            serial: plan.serials[i],
        };
        prop_assert_eq!(&got, want, "row {} ({:?})", i, r);
        prop_assert_eq!(plan.num_new[i] as usize, r.num_new);
        prop_assert_eq!(plan.query_starts[i] as usize, offset);
        offset += r.num_new;
        let (n, ls, p) = (r.seq_len, got.live_start as usize, got.protected as usize);
        prop_assert_eq!(ls % bs, 0);
        prop_assert_eq!(p % bs, 0);
        let base = ls.max(p);
        prop_assert_eq!(plan.bases[i] as usize, base);
        if got.target >= 0 {
            let t = got.target as usize;
            prop_assert!(
                t.is_multiple_of(bs) && t > base,
                "target {} base {}",
                t,
                base
            );
            prop_assert!(
                n - t >= b && n - t < b + bs,
                "target {} leaves {} live",
                t,
                n - t
            );
        } else if model.evicts
            && n > base
            && model
                .states
                .get(&r.key)
                .and_then(|s| s.prompt)
                .is_none_or(|p| n >= p)
        {
            // A prompt still being prefilled (its length known) is never evicted.
            prop_assert!(
                n - base < b + l,
                "{} live entries and no eviction",
                n - base
            );
        }
        // Attention reads exactly the live entries, in kernel coordinates.
        let live = n.min(p) + n.saturating_sub(base);
        let (wl, a, e) = (
            plan.window_lens[i] as usize,
            plan.attn_starts[i] as usize,
            plan.evict_starts[i] as usize,
        );
        prop_assert_eq!(wl - a, live, "row {}: window [{}, {})", i, a, wl);
        if model.protect {
            prop_assert_eq!((a, e), (0, p));
        } else {
            prop_assert_eq!((a, e), (ls, ls));
        }
    }
    prop_assert_eq!(plan.num_tokens, offset);
    // Each commit frees a new range, contiguous with the last one of the same state.
    for a in released {
        let serial = serial_of[&a.key];
        let ranges = freed.entry(serial).or_default();
        let from = a.evicted_from();
        prop_assert!(a.new_live_start > from && a.new_live_start % bs == 0);
        if let Some(&(_, end)) = ranges.last() {
            prop_assert_eq!(from, end, "ranges of serial {} not contiguous", serial);
        } else {
            prop_assert_eq!(from, a.protected_len, "first range of serial {}", serial);
        }
        ranges.push((from, a.new_live_start));
    }
    Ok(())
}

fn run(
    budget_blocks: usize,
    interval_blocks: usize,
    bs: usize,
    protect: bool,
    evicts: bool,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let (interval, budget) = (
        interval_blocks * bs,
        (budget_blocks.max(interval_blocks)) * bs,
    );
    let ev = EvictionConfig {
        budget,
        interval,
        protect_prompt: protect,
    };
    let mut planner = WindowPlanner::new(Schedule::new(&ev, bs).unwrap(), evicts);
    let mut model = Model {
        budget,
        interval,
        bs,
        protect,
        evicts,
        states: HashMap::new(),
        order: Vec::new(),
        serial: 0,
    };
    let mut reqs: HashMap<u64, Req> = HashMap::new();
    let mut plan = StepPlan::default();
    let mut freed: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
    let mut last_targets: Vec<(u64, u64, i32)> = Vec::new();
    for st in steps {
        let rows = rows_of(st, &mut reqs, &mut planner, &mut model);
        if let Some(kind) = st.poison {
            let before = (planner.clone(), plan.clone());
            let bad = poisoned(&rows, kind, &planner);
            let err = planner.plan(&bad, &mut plan);
            prop_assert!(err.is_err(), "poisoned batch accepted: {:?}", bad);
            if kind == 1 {
                prop_assert!(matches!(err, Err(WindowError::KeyTooLarge(_))));
            }
            prop_assert_eq!(planner.num_requests(), before.0.num_requests());
            for k in before.0.keys() {
                prop_assert_eq!(planner.state(k), before.0.state(k));
            }
            prop_assert_eq!(&plan, &before.1, "a failed plan wrote its output");
        }
        // Serials as they are before this step (commits refer to the state that planned them).
        let serial_of: HashMap<u64, u64> =
            model.states.iter().map(|(k, s)| (*k, s.serial)).collect();
        let (released, expected, dropped) = model.step(&rows);
        planner
            .plan(&rows, &mut plan)
            .map_err(|e| TestCaseError::fail(format!("valid batch refused: {e} ({rows:?})")))?;
        check_invariants(
            &model, &rows, &plan, &expected, &released, &dropped, &mut freed, &serial_of,
        )?;
        // One step late: exactly last step's surviving targets are committed now.
        let committed: Vec<(u64, usize)> =
            released.iter().map(|a| (a.key, a.new_live_start)).collect();
        let mut want: Vec<(u64, usize)> = Vec::new();
        for &(key, serial, t) in &last_targets {
            if serial_of.get(&key) == Some(&serial) && !want.iter().any(|w| w.0 == key) {
                want.push((key, t as usize));
            }
        }
        // A key listed twice last step (split rows) commits its last row's target.
        let mut last_by_key: HashMap<u64, i32> = HashMap::new();
        for &(key, _, t) in &last_targets {
            last_by_key.insert(key, t);
        }
        want.retain(|w| last_by_key[&w.0] >= 0);
        for w in &mut want {
            w.1 = last_by_key[&w.0] as usize;
        }
        let mut c = committed.clone();
        c.sort();
        want.sort();
        prop_assert_eq!(c, want, "commits are not last step's targets");
        last_targets = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key, plan.serials[i] as u64, plan.evict_to[i]))
            .collect();
        // The planner's state equals the model's.
        prop_assert_eq!(planner.num_requests(), model.states.len());
        for (k, m) in &model.states {
            let s = planner.state(*k).expect("model key in planner");
            prop_assert_eq!(
                (
                    s.serial,
                    s.window.len,
                    s.window.live_start,
                    s.window.protected_len,
                    s.pending
                ),
                (m.serial, m.len, m.live_start, m.protected, m.pending)
            );
            if let Some(ranges) = freed.get(&m.serial) {
                let end = ranges.last().map(|r| r.1).unwrap_or(0);
                prop_assert_eq!(end, m.live_start.max(m.protected));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(128)))]

    #[test]
    fn planner_follows_the_rules(
        budget_blocks in 1..5usize,
        interval_blocks in 1..4usize,
        bs in prop::sample::select(vec![1usize, 2, 4, 16]),
        protect in any::<bool>(),
        evicts in prop::bool::weighted(0.85),
        steps in prop::collection::vec(step(), 1..120),
    ) {
        run(budget_blocks, interval_blocks, bs, protect, evicts, &steps)?;
    }
}

/// One prompt of `prompt` tokens prefilled in the chunks `cuts` (then `decode` decode steps),
/// through a fresh planner; returns every row's plan: (seq_len, live_start, protected, evict_to,
/// window_len, attn_start, evict_start) and the committed advances per step.
#[allow(clippy::type_complexity)]
fn chunked_run(
    s: Schedule,
    prompt: usize,
    cuts: &[usize],
    decode: usize,
) -> (Vec<[i32; 7]>, Vec<Vec<Advance>>) {
    let mut planner = WindowPlanner::new(s, true);
    let mut plan = StepPlan::default();
    let mut ends: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < prompt)
        .collect();
    ends.sort_unstable();
    ends.dedup();
    ends.push(prompt);
    let (mut rows, mut released) = (Vec::new(), Vec::new());
    let mut done = 0;
    let lens = ends
        .iter()
        .map(|&e| (e, true))
        .chain((1..=decode).map(|i| (prompt + i, false)));
    for (len, prefill) in lens {
        let r = StepRequest {
            key: 9,
            seq_len: len,
            num_new: len - done,
            prefill,
            reset: done == 0,
            prompt_len: Some(prompt),
        };
        planner.plan(&[r], &mut plan).unwrap();
        rows.push([
            plan.seq_lens[0],
            plan.live_starts[0],
            plan.protected_lens[0],
            plan.evict_to[0],
            plan.window_lens[0],
            plan.attn_starts[0],
            plan.evict_starts[0],
        ]);
        released.push(plan.released.clone());
        done = len;
    }
    (rows, released)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(256)))]

    /// Chunked prefill is independent of the chunking: with the prompt's length known, a prompt in
    /// any chunks plans no eviction before its last chunk, and from the last chunk on (that chunk's
    /// row, the commits, every decode step after it) the plan equals the plan of the same prompt in
    /// one chunk.
    #[test]
    fn chunking_does_not_change_the_plan(
        budget_blocks in 1..5usize,
        interval_blocks in 1..4usize,
        bs in prop::sample::select(vec![1usize, 2, 4, 16]),
        protect in any::<bool>(),
        prompt in 1..400usize,
        cuts in prop::collection::vec(1..400usize, 0..8),
        decode in 0..200usize,
    ) {
        let ev = EvictionConfig {
            budget: budget_blocks.max(interval_blocks) * bs,
            interval: interval_blocks * bs,
            protect_prompt: protect,
        };
        let s = Schedule::new(&ev, bs).unwrap();
        let (one, one_rel) = chunked_run(s, prompt, &[], decode);
        let (many, many_rel) = chunked_run(s, prompt, &cuts, decode);
        let k = many.len() - one.len();
        for r in &many[..k] {
            prop_assert_eq!(r[3], -1, "eviction planned before the prompt's end: {:?}", r);
            prop_assert_eq!(r[1], 0);
        }
        prop_assert!(many_rel[..=k].iter().all(|r| r.is_empty()));
        prop_assert_eq!(&many[k..], &one[..]);
        prop_assert_eq!(&many_rel[k..], &one_rel[..]);
    }
}
