//! Golden Eviction against a brute-force reference on small traces, and its greedy record.

mod common;

use foresightkv::evict::{
    brute_force_future, golden_eviction, synthetic_trace, GoldenScores, Schedule, SyntheticConfig,
    Trace, TraceShape,
};
use proptest::prelude::*;

fn small_trace(seed: u64, len: usize, q: usize, kv: usize, d: usize) -> Trace {
    let shape = TraceShape {
        num_layers: 2,
        num_q_heads: q,
        num_kv_heads: kv,
        head_dim: d,
        len,
    };
    synthetic_trace(&SyntheticConfig {
        fact_rate: 0.1,
        recall_rate: 0.2,
        ..SyntheticConfig::new(shape, seed)
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn future_scores_match_brute_force(
        seed in any::<u64>(),
        len in 20usize..90,
        budget in 4usize..24,
        interval in 1usize..8,
        group in 1usize..4,
        prompt_len in 0usize..60,
    ) {
        let budget = budget.max(interval);
        let trace = small_trace(seed, len, 2 * group, 2, 8);
        let schedule = Schedule { budget, interval, prompt_len };
        let golden = GoldenScores::compute(&trace, schedule).unwrap();
        for layer in 0..2 {
            for kh in 0..2 {
                let brute = brute_force_future(&trace, schedule, layer, kh).unwrap();
                for (e, row) in brute.iter().enumerate() {
                    let seq_len = schedule.anchor() + e * interval;
                    for (pos, &want) in row.iter().enumerate() {
                        let got = golden.future(layer, kh, pos, seq_len);
                        prop_assert!((got - want).abs() <= 1e-5 * want.abs().max(1e-3), "l{layer} h{kh} e{e} pos {pos}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn greedy_record_evicts_the_lowest_future_scores(seed in any::<u64>(), len in 40usize..120) {
        let trace = small_trace(seed, len, 4, 2, 8);
        let schedule = Schedule::new(16, 4);
        let (scores, run) = golden_eviction(&trace, schedule).unwrap();
        // Evictions at anchor + e L strictly before the end of the trace.
        let evictions_per_head = len.saturating_sub(schedule.anchor()).div_ceil(schedule.interval);
        prop_assert_eq!(run.records.len(), 2 * 2 * evictions_per_head);
        for r in &run.records {
            prop_assert_eq!(r.victims.len(), schedule.interval);
            prop_assert_eq!(r.candidates.len(), schedule.budget);
            let brute = brute_force_future(&trace, schedule, r.layer, r.kv_head).unwrap();
            let e = (r.seq_len - schedule.anchor()) / schedule.interval;
            let future = |p: u32| if e < brute.len() { brute[e][p as usize] } else { 0.0 };
            let worst_kept = r.candidates.iter().filter(|p| !r.victims.contains(p)).map(|&p| future(p)).fold(f32::INFINITY, f32::min);
            for &v in &r.victims {
                prop_assert!(future(v) <= worst_kept + 1e-6, "victim {v} scored {} above kept {worst_kept}", future(v));
                prop_assert!((-scores.future(r.layer, r.kv_head, v as usize, r.seq_len) - r.scores[r.candidates.iter().position(|&c| c == v).unwrap()]).abs() < 1e-7);
            }
        }
    }
}

#[test]
fn schedule_is_validated() {
    let trace = small_trace(1, 30, 2, 1, 4);
    assert!(GoldenScores::compute(&trace, Schedule::new(2, 4)).is_err());
    assert!(GoldenScores::compute(&trace, Schedule::new(4, 0)).is_err());
}

#[test]
fn records_stay_far_below_a_full_matrix() {
    let trace = small_trace(3, 1024, 2, 1, 16);
    let g = GoldenScores::compute(&trace, Schedule::new(64, 16)).unwrap();
    let full_matrix = 2 * 1024 * 1024 * 4;
    assert!(
        g.record_bytes() < full_matrix / 8,
        "{} bytes of records",
        g.record_bytes()
    );
}

/// The partial last query block is divided by `L * G` (the official code pads it with zero rows),
/// computed here from the softmax directly; and no eviction happens at the trace's end.
#[test]
fn partial_last_block_divides_by_l_and_no_eviction_at_the_end() {
    let (b, l) = (8usize, 4usize);
    let len = b + l + 2 * l + 2; // anchor 12, full blocks [12, 16) and [16, 20), partial [20, 22)
    let trace = small_trace(5, len, 4, 2, 8);
    let s = trace.shape();
    let g = s.group_size();
    let schedule = Schedule::new(b, l);
    let golden = GoldenScores::compute(&trace, schedule).unwrap();
    for layer in 0..2 {
        let lt = trace.layer(layer).unwrap();
        for kh in 0..2 {
            let mut block = [0f64; 20];
            for j in 20..22 {
                for gi in 0..g {
                    let q = lt.query(&s, j, kh * g + gi);
                    let logits: Vec<f64> = (0..=j)
                        .map(|i| common::dot64(q, lt.key(&s, i, kh)) * s.scale() as f64)
                        .collect();
                    for (o, p) in block.iter_mut().zip(common::softmax(&logits)) {
                        *o += p;
                    }
                }
            }
            for (i, sum) in block.iter().enumerate() {
                let want = sum / (l * g) as f64;
                let got = golden.future(layer, kh, i, 20) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-3),
                    "l{layer} h{kh} token {i}: {got} vs {want} (a mean over 2 queries would be {})",
                    sum / (2 * g) as f64
                );
            }
        }
    }
    // A trace ending exactly on an eviction: the evictions are at 12 and 16, none at 20.
    let even = small_trace(6, b + 3 * l, 4, 2, 8);
    let (_, run) = golden_eviction(&even, schedule).unwrap();
    let mut lens: Vec<usize> = run.records.iter().map(|r| r.seq_len).collect();
    lens.sort_unstable();
    lens.dedup();
    assert_eq!(lens, vec![12, 16]);
    assert!(run
        .records
        .iter()
        .all(|r| r.scores.iter().any(|&x| x != 0.0)));
}
