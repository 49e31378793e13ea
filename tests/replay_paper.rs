//! The ForesightKV paper's setting (Qwen3-4B generating 32K tokens per request, all requests at
//! once, batch limited by KV memory): the replay's max batch must be what the KV arithmetic predicts.
//! The paper ran on an A800 (80 GB, the A100-80G's export twin) and reports 11 -> 96 at B = 1K; our
//! memory accounting differs from theirs, so the ratios are compared in the notes, and this test
//! checks our own arithmetic, written out by hand.

use foresightkv::replay::{replay, NoProgress, Policy, ReplayArgs, ScenarioKind};

#[test]
fn paper_setting_max_batch_matches_the_kv_arithmetic() {
    let args = ReplayArgs {
        scenario: ScenarioKind::Paper,
        gpu: "a800".into(),
        requests: Some(420),
        horizon_s: Some(5.0),
        quiet: true,
        ..ReplayArgs::default()
    };
    assert_eq!(
        (
            args.model.as_str(),
            args.prompt_len,
            args.output_len,
            args.mem_fraction
        ),
        ("qwen3-4b", 128, 32_768, 0.9)
    );
    let report = replay(&args, &NoProgress).unwrap();

    // KV bytes per token, Qwen3-4B: 2 (K, V) x 36 layers x 8 KV heads x 128 dims x 2 bytes = 147,456.
    // One block of 16 tokens: 2,359,296 bytes.
    // A800 memory 81,920 MiB x 0.9 = 77,309,411,328 bytes; weights 4.02e9 x 2 = 8,040,000,000 bytes;
    // KV memory 69,269,411,328 bytes / 2,359,296 = 29,360.2 -> 29,360 blocks.
    assert_eq!(report.setup.num_blocks, 29_360);
    // Full cache: a request holds (128 + 32,768) / 16 = 2,056 blocks at its end: 29,360 / 2,056 = 14.28 -> 14.
    // ForesightKV, L = 128: the live window peaks at B + L entries, block aligned:
    //   B = 1K: (1024 + 128) / 16 = 72 blocks  -> 29,360 / 72  = 407.8 -> 407
    //   B = 2K: (2048 + 128) / 16 = 136 blocks -> 29,360 / 136 = 215.9 -> 215
    //   B = 4K: (4096 + 128) / 16 = 264 blocks -> 29,360 / 264 = 111.2 -> 111
    let expected = [
        (Policy::Full, None, 14usize),
        (Policy::Foresight, Some(1024), 407),
        (Policy::Foresight, Some(2048), 215),
        (Policy::Foresight, Some(4096), 111),
    ];
    assert_eq!(report.runs.len(), expected.len());
    for (run, (policy, budget, batch)) in report.runs.iter().zip(expected) {
        assert_eq!((run.policy, run.budget), (policy, budget));
        assert_eq!(run.max_concurrent, batch, "{policy:?} at {budget:?}");
        assert_eq!(run.preemptions, 0);
        assert_eq!(run.blocks_leaked, 0);
    }
    // Max-batch growth at 1K: 407 / 14 = 29.1x (the paper: 96 / 11 = 8.7x with its own accounting).
    let growth = report.runs[1].max_concurrent as f64 / report.runs[0].max_concurrent as f64;
    assert!((growth - 407.0 / 14.0).abs() < 1e-9);
    // Peak KV memory of the full cache: 14 sequences, each 9 prompt blocks and one decode block per
    // 16 tokens after the first seconds; it cannot exceed the pool.
    assert!(report.runs.iter().all(|r| r.peak_kv_gib <= r.pool_kv_gib));
}
