//! Trace replay and the fidelity table: invariants of the replay, reproducibility of sampled runs,
//! trace files, and Golden Eviction leading the synthetic table.

mod common;

use foresightkv::evict::fidelity::{fidelity_table, FidelityOptions, PolicyName};
use foresightkv::evict::{
    simulate, synthetic_trace, EvictError, ForesightPolicy, FullCache, H2o, ModelShape,
    RandomEviction, Schedule, ScorerCheckpoint, ScorerConfig, SimOptions, SimResult, StatsMode,
    StreamingLlm, SyntheticConfig, Trace, TraceShape, VictimMode,
};
use proptest::prelude::*;
use std::sync::Arc;

fn shape(len: usize) -> TraceShape {
    TraceShape {
        num_layers: 2,
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        len,
    }
}

fn trace(len: usize, seed: u64) -> Trace {
    synthetic_trace(&SyntheticConfig::new(shape(len), seed)).unwrap()
}

fn opts(budget: usize, interval: usize, record: bool) -> SimOptions {
    SimOptions {
        request: 3,
        record,
        ..SimOptions::new(Schedule::new(budget, interval))
    }
}

/// Asserts a replay evicted nothing and so kept all the attention mass.
fn assert_nothing_evicted(r: &SimResult) {
    assert_eq!(r.fidelity.evictions, 0);
    assert!((r.fidelity.mass() - 1.0).abs() < 1e-9);
}

#[test]
fn full_cache_keeps_everything() {
    let t = trace(200, 1);
    let r = simulate(&t, &FullCache, &opts(32, 8, false)).unwrap();
    assert_nothing_evicted(&r);
    assert!(r.fidelity.rel_err() < 1e-6);
}

#[test]
fn budget_beyond_the_trace_is_the_full_cache() {
    let t = trace(100, 2);
    let r = simulate(&t, &H2o, &opts(96, 8, false)).unwrap();
    assert_nothing_evicted(&r);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    /// Every eviction brings the live set back to B, choosing among all but the newest L; the first
    /// eviction comes right after a prompt longer than B, then every L tokens, never at the end of
    /// the trace (nothing later to measure); the mass kept is a fraction.
    #[test]
    fn replay_respects_the_schedule(
        seed in any::<u64>(),
        len in 60usize..160,
        budget in 8usize..40,
        interval in 1usize..8,
        prompt_len in 0usize..80,
    ) {
        let budget = budget.max(interval);
        let t = trace(len, seed);
        let schedule = Schedule { budget, interval, prompt_len };
        let o = SimOptions { request: 3, record: true, ..SimOptions::new(schedule) };
        let r = simulate(&t, &RandomEviction { seed }, &o).unwrap();
        let first = if prompt_len > budget { prompt_len } else { budget + interval };
        let per_head: Vec<usize> = (first..len).step_by(interval).collect();
        prop_assert_eq!(r.records.len(), 4 * per_head.len());
        for rec in &r.records {
            prop_assert!(per_head.contains(&rec.seq_len));
            let live = if rec.seq_len == first { first } else { budget + interval };
            prop_assert_eq!(rec.candidates.len(), live - interval);
            prop_assert_eq!(rec.victims.len(), live - budget);
            prop_assert!(rec.victims.iter().all(|v| rec.candidates.contains(v)));
            prop_assert!(rec.candidates.iter().all(|&p| (p as usize) < rec.seq_len - interval));
        }
        let m = r.fidelity.mass();
        prop_assert!(m > 0.0 && m <= 1.0 + 1e-9);
    }
}

#[test]
fn sampled_foresight_runs_reproduce() {
    let t = trace(160, 4);
    let s = t.shape();
    let cfg = ScorerConfig::new(
        ModelShape {
            num_layers: 2,
            num_kv_heads: 2,
            group_size: s.group_size(),
            head_dim: s.head_dim,
        },
        32,
        8,
    );
    let ck = Arc::new(ScorerCheckpoint::random(cfg, 1, 0.3).unwrap());
    let p = ForesightPolicy::new(
        ck.clone(),
        VictimMode::Sample {
            seed: 11,
            temperature: 1.0,
        },
    );
    let a = simulate(&t, &p, &opts(32, 8, true)).unwrap();
    let b = simulate(&t, &p, &opts(32, 8, true)).unwrap();
    assert_eq!(a.records, b.records);
    assert!(!a.records.is_empty());
    let other = ForesightPolicy::new(
        ck,
        VictimMode::Sample {
            seed: 12,
            temperature: 1.0,
        },
    );
    let c = simulate(&t, &other, &opts(32, 8, true)).unwrap();
    assert_ne!(a.records, c.records);
}

#[test]
fn trace_file_round_trip_and_bad_files() {
    let t = trace(50, 5);
    let bytes = t.to_bytes().unwrap();
    let back = Trace::from_bytes(bytes.clone(), "t").unwrap();
    assert_eq!(back.shape(), t.shape());
    assert_eq!(back.layer(1).unwrap(), t.layer(1).unwrap());
    assert!(matches!(
        Trace::from_bytes(bytes[..bytes.len() - 3].to_vec(), "t"),
        Err(EvictError::SafeTensors { .. })
    ));
    assert!(matches!(
        back.layer(2),
        Err(EvictError::InvalidArgument { .. })
    ));
    let dir = std::env::temp_dir().join(format!("fkv-trace-{}.safetensors", std::process::id()));
    t.save(&dir).unwrap();
    assert_eq!(
        Trace::load(&dir).unwrap().layer(0).unwrap(),
        t.layer(0).unwrap()
    );
    std::fs::remove_file(&dir).unwrap();
}

#[test]
fn foresight_without_scorer_is_a_typed_error() {
    let t = trace(80, 6);
    let o = FidelityOptions {
        budgets: vec![16],
        interval: 8,
        prompt_len: 0,
        policies: vec![PolicyName::Foresight],
        scorer: None,
        foresight_mode: VictimMode::TopL,
        seed: 0,
        stats_mode: StatsMode::Paper,
    };
    assert!(matches!(
        fidelity_table("t", &t, &o),
        Err(EvictError::InvalidArgument { .. })
    ));
}

/// On a structured synthetic trace Golden Eviction keeps the most attention mass and has the
/// lowest output error of all policies, at every budget.
#[test]
fn golden_leads_the_synthetic_table() {
    let t = trace(384, 7);
    let o = FidelityOptions {
        budgets: vec![32, 64, 128],
        interval: 8,
        prompt_len: 0,
        policies: vec![
            PolicyName::Streaming,
            PolicyName::H2o,
            PolicyName::Snapkv,
            PolicyName::Tova,
            PolicyName::Rkv,
            PolicyName::Random,
            PolicyName::Golden,
        ],
        scorer: None,
        foresight_mode: VictimMode::TopL,
        seed: 0,
        stats_mode: StatsMode::Paper,
    };
    let rows = fidelity_table("synthetic", &t, &o).unwrap();
    for &b in &o.budgets {
        let at: Vec<_> = rows.iter().filter(|r| r.budget == b).collect();
        let golden = at.iter().find(|r| r.policy == "golden").unwrap();
        for r in &at {
            assert!(
                golden.mass_kept >= r.mass_kept,
                "budget {b}: {} keeps {} > golden {}",
                r.policy,
                r.mass_kept,
                golden.mass_kept
            );
            assert!(
                golden.rel_err <= r.rel_err,
                "budget {b}: {} error {} < golden {}",
                r.policy,
                r.rel_err,
                golden.rel_err
            );
        }
    }
}

#[test]
fn streaming_keeps_sinks_through_a_replay() {
    let t = trace(120, 8);
    let r = simulate(&t, &StreamingLlm::default(), &opts(16, 4, true)).unwrap();
    for rec in &r.records {
        assert!(rec.victims.iter().all(|&p| p >= 4), "{:?}", rec.victims);
    }
}

#[test]
#[cfg(feature = "cli")]
fn fidelity_command_writes_trace_and_rows() {
    use foresightkv::cli::fidelity::{run as run_fidelity, FidelityArgs};
    let dir = std::env::temp_dir().join(format!("fkv-fid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (trace_path, json_path) = (dir.join("syn.safetensors"), dir.join("rows.json"));
    let args = FidelityArgs {
        traces: vec![],
        budgets: vec![16, 32],
        interval: 8,
        prompt_len: 20,
        policies: vec![PolicyName::Full, PolicyName::H2o, PolicyName::Golden],
        scorer: None,
        stats_mode: None,
        top_l: false,
        seed: 0,
        syn_len: 96,
        syn_layers: 1,
        syn_q_heads: 2,
        syn_kv_heads: 1,
        syn_head_dim: 8,
        syn_seed: 3,
        save_synthetic: Some(trace_path.clone()),
        json: Some(json_path.clone()),
    };
    run_fidelity(&args).unwrap();
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 6);
    let saved = Trace::load(&trace_path).unwrap();
    assert_eq!(saved.shape().len, 96);
    // Replaying the saved file gives the same rows as the in-memory synthetic trace.
    let again = FidelityArgs {
        traces: vec![trace_path],
        save_synthetic: None,
        json: Some(dir.join("rows2.json")),
        ..args
    };
    run_fidelity(&again).unwrap();
    let rows2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("rows2.json")).unwrap()).unwrap();
    for (a, b) in rows
        .as_array()
        .unwrap()
        .iter()
        .zip(rows2.as_array().unwrap())
    {
        assert_eq!(a["fidelity"], b["fidelity"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scorer trained on official statistics is refused by a paper-mode replay, with both modes named;
/// in its own mode it runs.
#[test]
fn replay_refuses_a_scorer_of_another_stats_mode() {
    let t = trace(96, 9);
    let s = t.shape();
    let shape = ModelShape {
        num_layers: 2,
        num_kv_heads: 2,
        group_size: s.group_size(),
        head_dim: s.head_dim,
    };
    let cfg = ScorerConfig::new(shape, 32, 8).with_stats_mode(StatsMode::Official);
    let ck = Arc::new(ScorerCheckpoint::random(cfg, 1, 0.3).unwrap());
    let p = ForesightPolicy::new(ck, VictimMode::TopL);
    let err = simulate(&t, &p, &opts(32, 8, false)).unwrap_err();
    common::assert_official_scorer_refused(&err);
    let msg = err.to_string();
    assert!(
        msg.contains("'official'") && msg.contains("'paper'"),
        "{msg}"
    );
    let o = SimOptions {
        stats_mode: StatsMode::Official,
        ..opts(32, 8, false)
    };
    assert!(simulate(&t, &p, &o).unwrap().fidelity.evictions > 0);
}
