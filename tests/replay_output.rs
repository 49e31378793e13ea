//! The replay's outputs: the default arguments, the table, the JSON report, the PNG plot, and the
//! exported block-manager operation sequence (replayed into a fresh manager, which must end full).

use foresightkv::block::KvCacheManager;
use foresightkv::cli::replay::run;
use foresightkv::replay::{replay, Admission, NoProgress, Policy, ReplayArgs, ScenarioKind};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fkv-replay-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn defaults_are_the_documented_ones() {
    let a = ReplayArgs::default();
    assert_eq!(
        (
            a.trace.as_str(),
            a.scenario,
            a.model.as_str(),
            a.gpu.as_str()
        ),
        ("conv", ScenarioKind::Reasoning, "qwen3-4b", "h200")
    );
    assert_eq!(a.policy, vec![Policy::Foresight]);
    assert_eq!(a.budgets, vec![1024, 2048, 4096]);
    assert_eq!(
        (a.interval, a.block_size, a.admission),
        (128, 16, Admission::Footprint)
    );
    assert!(a.json.is_none() && a.plot.is_none() && a.export_ops.is_none());
}

fn small_args(dir: &std::path::Path) -> ReplayArgs {
    ReplayArgs {
        trace: "code".into(),
        scenario: ScenarioKind::Recorded,
        requests: Some(60),
        model: "qwen3-1.7b".into(),
        gpu: "l4".into(),
        mem_fraction: 0.3,
        policy: vec![Policy::Foresight, Policy::Streaming],
        budgets: vec![256, 512],
        interval: 64,
        rate_scale: 20.0,
        json: Some(dir.join("report.json")),
        plot: Some(dir.join("replay.png")),
        export_ops: Some(dir.join("ops.csv")),
        quiet: true,
        ..ReplayArgs::default()
    }
}

#[test]
fn table_json_png_and_exported_ops() {
    let dir = temp_dir("out");
    let args = small_args(&dir);
    let report = replay(&args, &NoProgress).unwrap();
    assert_eq!(report.runs.len(), 5, "full + 2 policies x 2 budgets");
    assert!(report
        .runs
        .iter()
        .all(|r| r.finished == 60 && r.blocks_leaked == 0));
    let table = report.table();
    assert_eq!(table.lines().count(), 2 + 5, "{table}");
    for word in [
        "policy",
        "out tok/s",
        "TTFT p99",
        "TPOT p50",
        "peak KV",
        "leaked",
        "foresight",
        "streaming",
    ] {
        assert!(table.contains(word), "{word} missing from\n{table}");
    }

    run(&args).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 5);
    assert_eq!(json["runs"][0]["policy"], "full");
    assert_eq!(json["runs"][1]["budget"], 256);
    assert_eq!(json["setup"]["model"], "qwen3-1.7b");
    let png = std::fs::read(dir.join("replay.png")).unwrap();
    assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"));

    // The exported operations are the first evicting run's (foresight at B = 256): applying them to a
    // fresh manager with that configuration succeeds and leaves the pool full.
    let num_blocks = report.setup.num_blocks;
    let manager = KvCacheManager::new(foresightkv::block::CacheConfig {
        block_size: 16,
        num_blocks,
        enable_prefix_caching: false,
        eviction: Some(foresightkv::block::EvictionConfig {
            budget: 256,
            interval: 64,
            protect_prompt: false,
        }),
    })
    .unwrap();
    let ops = std::fs::read_to_string(dir.join("ops.csv")).unwrap();
    let mut lines = ops.lines();
    assert_eq!(lines.next(), Some("op,seq,arg"));
    let (mut adds, mut compacts) = (0, 0);
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let seq: u64 = f[1].parse().unwrap();
        match f[0] {
            "add" => {
                adds += 1;
                manager
                    .add_sequence(seq, &vec![7; f[2].parse().unwrap()])
                    .unwrap();
            }
            "append" => {
                manager
                    .append(seq, &vec![7; f[2].parse().unwrap()])
                    .unwrap();
            }
            "compact" => {
                compacts += 1;
                manager.compact(seq).unwrap();
                assert_eq!(
                    manager.live_start(seq).unwrap(),
                    f[2].parse::<usize>().unwrap()
                );
            }
            "free" => manager.free(seq).unwrap(),
            "preempt" => {
                manager.preempt(seq).unwrap();
            }
            other => panic!("unknown op {other}"),
        }
    }
    assert_eq!(adds, 60);
    assert!(compacts > 0);
    assert_eq!(manager.num_free_blocks(), num_blocks);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = temp_dir("bad");
    let csv = dir.join("t.csv");
    std::fs::write(
        &csv,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,-3,5\n",
    )
    .unwrap();
    let base = ReplayArgs {
        quiet: true,
        ..ReplayArgs::default()
    };
    let err = replay(
        &ReplayArgs {
            trace: csv.display().to_string(),
            ..base.clone()
        },
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
    assert!(replay(
        &ReplayArgs {
            budgets: vec![1000],
            ..base.clone()
        },
        &NoProgress,
    )
    .unwrap_err()
    .to_string()
    .contains("multiple"));
    assert!(replay(
        &ReplayArgs {
            model: "nope".into(),
            ..base.clone()
        },
        &NoProgress,
    )
    .unwrap_err()
    .to_string()
    .contains("qwen3-4b"));
    assert!(replay(
        &ReplayArgs {
            trace: dir.join("missing.csv").display().to_string(),
            ..base
        },
        &NoProgress,
    )
    .is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
