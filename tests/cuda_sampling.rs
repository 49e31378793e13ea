//! Reproducible victim sampling on the GPU (`fkv_sample_survivors`) against the CPU reference
//! `evict::select_survivors_batch` with `VictimMode::Sample`: bit-identical survivors on random
//! shapes and scores (special values included) where a GPU is visible, the kernel's arithmetic
//! contract checked against the CPU reference everywhere, and bad arguments refused before launch.
#![allow(clippy::needless_range_loop)]

mod kernels_support;

use foresightkv::cuda::{
    launch_sample_survivors, CudaError, DeviceArray, DeviceBuffer, DeviceSample, DeviceWindows,
};
use foresightkv::evict::philox::{det_ln, philox4x32_10};
use foresightkv::evict::{select_survivors_batch, BatchSelect, VictimMode};
use foresightkv::kernels::{score_key, KernelError, SelectArgs};
use kernels_support::{require_gpu, runner, shapes, uniform, Scenario};
use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the random scores of a case are drawn.
#[derive(Debug, Clone, Copy)]
enum ScoreKind {
    /// Uniform in [-3, 3].
    Spread,
    /// Five integer values: many equal scores.
    Ties,
    /// Mostly spread, with NaNs (random sign and payload), infinities, zeros of both signs,
    /// subnormals and values near f32::MAX.
    Special,
}

fn score_kinds() -> impl Strategy<Value = ScoreKind> {
    prop::sample::select(vec![ScoreKind::Spread, ScoreKind::Ties, ScoreKind::Special])
}

/// Temperatures: the paper's 1.0, ordinary ones, and extremes (tiny, subnormal, large).
fn temperatures() -> impl Strategy<Value = f32> {
    prop::sample::select(vec![1.0f32, 0.5, 2.0, 1e-3, 1e-40, 37.0])
}

fn random_score(rng: &mut ChaCha8Rng, kind: ScoreKind) -> f32 {
    match kind {
        ScoreKind::Spread => uniform(rng, 3.0),
        ScoreKind::Ties => rng.random_range(0..5) as f32 - 2.0,
        ScoreKind::Special => match rng.random_range(0..20) {
            0 => {
                let sign = if rng.random::<bool>() { 0x8000_0000 } else { 0 };
                let payload = rng.random_range(1u32..0x0080_0000);
                f32::from_bits(sign | 0x7F80_0000 | payload)
            }
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => f32::from_bits(rng.random_range(1u32..0x0080_0000)),
            6 => -f32::from_bits(rng.random_range(1u32..0x0080_0000)),
            7 => f32::MAX * if rng.random::<bool>() { 1.0 } else { -0.99 },
            _ => uniform(rng, 3.0),
        },
    }
}

/// One batch of one layer: windows, scores, victims and sampling keys.
#[derive(Debug, Clone)]
struct Batch {
    seq_lens: Vec<i32>,
    live_starts: Vec<i32>,
    args: SelectArgs,
    scores: Vec<f32>,
    num_evict: Vec<i32>,
    requests: Vec<u32>,
    evictions: Vec<u32>,
    layer: u32,
    seed: u64,
    temperature: f32,
}

impl Batch {
    /// Scores, victim counts and keys for the given windows.
    #[allow(clippy::too_many_arguments)]
    fn new(
        seq_lens: Vec<i32>,
        live_starts: Vec<i32>,
        heads: usize,
        protected: usize,
        frac: f64,
        kind: ScoreKind,
        temperature: f32,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let n = seq_lens.len();
        let lives: Vec<usize> = (0..n)
            .map(|s| (seq_lens[s] - live_starts[s]) as usize)
            .collect();
        let max_live = lives.iter().copied().max().unwrap_or(0) + rng.random_range(0..3);
        let scores = (0..n * heads * max_live)
            .map(|_| random_score(rng, kind))
            .collect();
        let num_evict = lives
            .iter()
            .map(|&l| (l.saturating_sub(protected) as f64 * frac) as i32)
            .collect();
        Self {
            seq_lens,
            live_starts,
            args: SelectArgs {
                num_kv_heads: heads as i64,
                max_live: max_live as i64,
                num_protected: protected as i64,
            },
            scores,
            num_evict,
            requests: (0..n).map(|_| rng.random()).collect(),
            evictions: (0..n).map(|_| rng.random()).collect(),
            layer: rng.random_range(0..0x1_0000),
            seed: rng.random(),
            temperature,
        }
    }

    fn mode(&self) -> VictimMode {
        VictimMode::Sample {
            seed: self.seed,
            temperature: self.temperature,
        }
    }

    /// The CPU reference's survivors (unwritten entries stay -3).
    fn cpu(&self) -> Vec<i32> {
        let batch = BatchSelect {
            seq_lens: &self.seq_lens,
            live_starts: &self.live_starts,
            args: self.args,
            scores: &self.scores,
            num_evict: &self.num_evict,
            requests: &self.requests,
            evictions: &self.evictions,
            layer: self.layer,
        };
        let mut out = vec![-3i32; self.scores.len()];
        select_survivors_batch(&batch, &self.mode(), &mut out).unwrap();
        out
    }
}

/// The kernel's sampling key of live slot `slot` of (sequence `s`, head `kh`), step by step as
/// csrc/sample_survivors.cu computes it: the raw Philox counter and key, the uniform's bit recipe,
/// `-det_ln(-det_ln(u))`, and its explicit NaN rule (the quieted, widened NaN of the score).
fn kernel_key(b: &Batch, s: usize, kh: usize, slot: usize, score: f32) -> f64 {
    if score.is_nan() {
        let u = score.to_bits() as u64;
        return f64::from_bits(
            ((u >> 31) << 63) | (0x7FF << 52) | (1 << 51) | ((u & 0x007F_FFFF) << 29),
        );
    }
    let w = philox4x32_10(
        [
            slot as u32,
            b.evictions[s],
            (b.layer << 16) | kh as u32,
            b.requests[s],
        ],
        [b.seed as u32, (b.seed >> 32) as u32],
    );
    let n = ((w[0] as u64) << 20) | ((w[1] >> 12) as u64);
    let u = (n as f64 + 0.5) * f64::from_bits(0x3CB0_0000_0000_0000);
    let g = -det_ln(-det_ln(u));
    score as f64 / b.temperature as f64 + g
}

/// The kernel's order of binary64 keys: the bits mapped to an unsigned total-order key.
fn order_key(x: f64) -> u64 {
    let u = x.to_bits();
    if u >> 63 == 1 {
        !u
    } else {
        u | (1 << 63)
    }
}

/// Survivors by the kernel's contract: candidates = top `min(2 n, unprotected)` by
/// `score_key` (ties: lower slot), victims = the `n` largest `order_key(kernel_key)` among them
/// (ties: lower slot), survivors ascending.
fn kernel_contract(b: &Batch) -> Vec<i32> {
    let heads = b.args.num_kv_heads as usize;
    let ml = b.args.max_live as usize;
    let mut out = vec![-3i32; b.scores.len()];
    for s in 0..b.seq_lens.len() {
        let live = (b.seq_lens[s] - b.live_starts[s]) as usize;
        let cand = live.saturating_sub(b.args.num_protected as usize);
        let n = b.num_evict[s] as usize;
        for kh in 0..heads {
            let row = (s * heads + kh) * ml;
            let sc = &b.scores[row..row + live];
            let mut by_score: Vec<usize> = (0..cand).collect();
            by_score.sort_by_key(|&i| (std::cmp::Reverse(score_key(sc[i])), i));
            let mut pool: Vec<(u64, usize)> = by_score[..(2 * n).min(cand)]
                .iter()
                .map(|&i| (order_key(kernel_key(b, s, kh, i, sc[i])), i))
                .collect();
            pool.sort_by_key(|&(k, i)| (std::cmp::Reverse(k), i));
            let victims: Vec<usize> = pool[..n].iter().map(|&(_, i)| i).collect();
            let kept: Vec<i32> = (0..live)
                .filter(|i| !victims.contains(i))
                .map(|i| i as i32)
                .collect();
            out[row..row + kept.len()].copy_from_slice(&kept);
        }
    }
    out
}

/// Random windows for the CPU-only contract test.
fn windows() -> impl Strategy<Value = (Vec<i32>, Vec<i32>)> {
    prop::collection::vec((0i32..300, 0i32..50), 1..4).prop_map(|v| {
        let starts: Vec<i32> = v.iter().map(|p| p.1).collect();
        let lens = v.iter().map(|p| p.0 + p.1).collect();
        (lens, starts)
    })
}

proptest! {
    #![proptest_config(Config { cases: 64, failure_persistence: None, ..Config::default() })]

    /// The Philox counter/key, uniform, `det_ln`/Gumbel, NaN and ordering recipe the kernel
    /// implements is exactly what the CPU reference computes.
    #[test]
    fn kernel_contract_is_the_cpu_sampler(
        (seq_lens, live_starts) in windows(),
        heads in 1usize..4,
        protected in 0usize..20,
        frac in 0.0f64..=1.0,
        kind in score_kinds(),
        temperature in temperatures(),
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let b = Batch::new(seq_lens, live_starts, heads, protected, frac, kind, temperature, &mut rng);
        prop_assert_eq!(kernel_contract(&b), b.cpu());
    }

    /// The kernel's unsigned order key sorts binary64 values exactly like `f64::total_cmp`.
    #[test]
    fn order_key_is_total_cmp(a in any::<u64>(), b in any::<u64>()) {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        prop_assert_eq!(order_key(x).cmp(&order_key(y)), x.total_cmp(&y));
    }

    /// A NaN score's CPU key (widen, divide, add) is the quieted widened NaN the kernel writes.
    #[test]
    fn nan_score_key_is_the_widened_quiet_nan(
        sign in any::<bool>(),
        payload in 1u32..0x0080_0000,
        temperature in temperatures(),
        g in -40.0f64..40.0,
    ) {
        let x = f32::from_bits(if sign { 0x8000_0000 } else { 0 } | 0x7F80_0000 | payload);
        let u = x.to_bits() as u64;
        let want = ((u >> 31) << 63) | (0x7FF << 52) | (1 << 51) | ((u & 0x007F_FFFF) << 29);
        let got = (std::hint::black_box(x) as f64 / temperature as f64 + g).to_bits();
        prop_assert_eq!(got, want);
    }
}

/// Launches the kernel on one batch and returns the survivors buffer (initialised to -3).
fn gpu_survivors(
    b: &Batch,
    windows_lens: &DeviceBuffer,
    windows_starts: &DeviceBuffer,
) -> Vec<i32> {
    let n = b.seq_lens.len();
    let up_f32 = DeviceBuffer::from_host(0, &b.scores).expect("upload scores");
    let up_ne = DeviceBuffer::from_host(0, &b.num_evict).expect("upload num_evict");
    let up_rq = DeviceBuffer::from_host(0, &b.requests).expect("upload requests");
    let up_ev = DeviceBuffer::from_host(0, &b.evictions).expect("upload evictions");
    let out = DeviceBuffer::from_host(0, &vec![-3i32; b.scores.len()]).expect("upload survivors");
    let windows = DeviceWindows {
        block_tables: 0,
        seq_lens: windows_lens.ptr(),
        live_starts: windows_starts.ptr(),
        block_table_stride: 0,
        seq_lens_host: &b.seq_lens,
        live_starts_host: &b.live_starts,
    };
    let batch = DeviceSample {
        args: b.args,
        scores: DeviceArray::new(up_f32.ptr(), b.scores.len()),
        num_evict: DeviceArray::new(up_ne.ptr(), n),
        num_evict_host: &b.num_evict,
        requests: DeviceArray::new(up_rq.ptr(), n),
        evictions: DeviceArray::new(up_ev.ptr(), n),
        layer: b.layer,
        seed: b.seed,
        temperature: b.temperature,
    };
    unsafe {
        launch_sample_survivors(
            0,
            0,
            &windows,
            &batch,
            DeviceArray::new(out.ptr(), b.scores.len()),
        )
        .expect("launch fkv_sample_survivors");
    }
    out.to_host().expect("download survivors")
}

/// GPU survivors equal the CPU reference's on random paged-batch shapes.
fn compare_on_shapes(max_live: usize, cases: u32) {
    require_gpu();
    let strat = (
        shapes(vec![64], max_live, 0),
        0usize..40,
        0.0f64..=1.0,
        score_kinds(),
        temperatures(),
    );
    runner(cases)
        .run(&strat, |(shape, protected, frac, kind, temperature)| {
            let mut sc = Scenario::<f32>::new(shape);
            let heads = sc.shape.kv_heads;
            let b = Batch::new(
                sc.seq_lens.clone(),
                sc.live_starts.clone(),
                heads,
                protected,
                frac,
                kind,
                temperature,
                &mut sc.rng,
            );
            let lens = DeviceBuffer::from_host(0, &b.seq_lens).expect("upload seq_lens");
            let starts = DeviceBuffer::from_host(0, &b.live_starts).expect("upload live_starts");
            let got = gpu_survivors(&b, &lens, &starts);
            prop_assert_eq!(
                got,
                b.cpu(),
                "batch {:?}",
                (
                    &b.seq_lens,
                    &b.live_starts,
                    b.args,
                    &b.num_evict,
                    b.layer,
                    b.seed,
                    b.temperature,
                    kind
                )
            );
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_sampling_matches_cpu() {
    compare_on_shapes(900, 48);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_sampling_matches_cpu_on_long_windows() {
    compare_on_shapes(5000, 8);
}

/// The argument error of a launch that must be refused.
fn kerr(r: Result<(), CudaError>) -> KernelError {
    match r {
        Err(CudaError::Kernel(e)) => e,
        Err(e) => panic!("expected a kernel argument error, got {e}"),
        Ok(()) => panic!("expected a kernel argument error, got Ok"),
    }
}

/// Host mirrors of a two-sequence batch: live 20 and 3, two heads, rows of 20.
const LENS: [i32; 2] = [36, 3];
const STARTS: [i32; 2] = [16, 0];
const NUM_EVICT: [i32; 2] = [8, 0];

fn fake(len: usize) -> DeviceArray {
    DeviceArray::new(0x1000, len)
}

fn good_windows() -> DeviceWindows<'static> {
    DeviceWindows {
        block_tables: 0,
        seq_lens: 0x3000,
        live_starts: 0x4000,
        block_table_stride: 0,
        seq_lens_host: &LENS,
        live_starts_host: &STARTS,
    }
}

fn good_batch() -> DeviceSample<'static> {
    DeviceSample {
        args: SelectArgs {
            num_kv_heads: 2,
            max_live: 20,
            num_protected: 4,
        },
        scores: fake(80),
        num_evict: fake(2),
        num_evict_host: &NUM_EVICT,
        requests: fake(2),
        evictions: fake(2),
        layer: 3,
        seed: 11,
        temperature: 1.0,
    }
}

fn launch(
    w: &DeviceWindows<'_>,
    b: &DeviceSample<'_>,
    survivors: DeviceArray,
) -> Result<(), CudaError> {
    unsafe { launch_sample_survivors(0, 0, w, b, survivors) }
}

/// Bad arguments are refused with typed errors before any launch, with or without a GPU.
#[test]
fn sample_launcher_rejects_bad_arguments_before_launch() {
    let w = good_windows();
    let b = good_batch();
    let invalid = |r, want: &str| match kerr(r) {
        KernelError::InvalidArgument { name, .. } => assert_eq!(name, want),
        e => panic!("expected InvalidArgument({want}), got {e}"),
    };
    invalid(
        launch(
            &w,
            &DeviceSample {
                num_evict_host: &[17, 0],
                ..b
            },
            fake(80),
        ),
        "num_evict",
    );
    invalid(
        launch(
            &w,
            &DeviceSample {
                num_evict_host: &[-1, 0],
                ..b
            },
            fake(80),
        ),
        "num_evict",
    );
    for t in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        invalid(
            launch(
                &w,
                &DeviceSample {
                    temperature: t,
                    ..b
                },
                fake(80),
            ),
            "temperature",
        );
    }
    invalid(
        launch(
            &w,
            &DeviceSample {
                layer: 0x1_0000,
                ..b
            },
            fake(80),
        ),
        "layer",
    );
    invalid(
        launch(
            &w,
            &DeviceSample {
                args: SelectArgs {
                    num_protected: -1,
                    ..b.args
                },
                ..b
            },
            fake(80),
        ),
        "num_protected",
    );
    let many_heads = DeviceSample {
        args: SelectArgs {
            num_kv_heads: 70_000,
            ..b.args
        },
        scores: fake(2 * 70_000 * 20),
        ..b
    };
    assert!(matches!(
        kerr(launch(&w, &many_heads, fake(2 * 70_000 * 20))),
        KernelError::InvalidSize {
            name: "num_kv_heads",
            ..
        }
    ));
    assert!(matches!(
        kerr(launch(
            &w,
            &DeviceSample {
                num_evict_host: &[8],
                ..b
            },
            fake(80)
        )),
        KernelError::ShapeMismatch(_)
    ));
    assert!(matches!(
        kerr(launch(
            &w,
            &DeviceSample {
                scores: fake(79),
                ..b
            },
            fake(80)
        )),
        KernelError::BufferTooSmall { name: "scores", .. }
    ));
    assert!(matches!(
        kerr(launch(&w, &b, fake(60))),
        KernelError::BufferTooSmall {
            name: "survivors",
            ..
        }
    ));
    let short_rows = DeviceSample {
        args: SelectArgs {
            max_live: 10,
            ..b.args
        },
        ..b
    };
    invalid(launch(&w, &short_rows, fake(80)), "max_live");
    for (name, bad) in [
        (
            "scores",
            DeviceSample {
                scores: DeviceArray::new(0, 80),
                ..b
            },
        ),
        (
            "num_evict",
            DeviceSample {
                num_evict: DeviceArray::new(0, 2),
                ..b
            },
        ),
        (
            "requests",
            DeviceSample {
                requests: DeviceArray::new(0, 2),
                ..b
            },
        ),
        (
            "evictions",
            DeviceSample {
                evictions: DeviceArray::new(0, 2),
                ..b
            },
        ),
    ] {
        assert!(
            matches!(kerr(launch(&w, &bad, fake(80))), KernelError::NullPointer(n) if n == name),
            "{name}"
        );
    }
    assert!(matches!(
        kerr(launch(&w, &b, DeviceArray::new(0, 80))),
        KernelError::NullPointer("survivors")
    ));
    for (name, bad) in [
        (
            "num_evict",
            DeviceSample {
                num_evict: fake(1),
                ..b
            },
        ),
        (
            "requests",
            DeviceSample {
                requests: fake(1),
                ..b
            },
        ),
        (
            "evictions",
            DeviceSample {
                evictions: fake(1),
                ..b
            },
        ),
    ] {
        assert!(
            matches!(kerr(launch(&w, &bad, fake(80))), KernelError::BufferTooSmall { name: n, have: 1, need: 2 } if n == name),
            "{name}"
        );
    }
    let bad_window = DeviceWindows {
        live_starts_host: &[40, 0],
        ..w
    };
    assert!(matches!(
        kerr(launch(&bad_window, &b, fake(80))),
        KernelError::BadWindow { seq: 0, .. }
    ));
    let null_lens = DeviceWindows { seq_lens: 0, ..w };
    assert!(matches!(
        kerr(launch(&null_lens, &b, fake(80))),
        KernelError::NullPointer("seq_lens")
    ));
}

/// Valid arguments pass validation: the launch gets as far as the runtime and fails there (no
/// kernels, no driver, or, on a machine with GPUs, no device of the absurd ordinal asked for, so
/// the fake addresses never reach a real launch), never with an argument error.
#[test]
fn sample_launcher_accepts_valid_arguments() {
    // SAFETY: device 4096 does not exist, so nothing is launched.
    match unsafe { launch_sample_survivors(4096, 0, &good_windows(), &good_batch(), fake(80)) } {
        Err(CudaError::Kernel(e)) => panic!("valid arguments refused: {e}"),
        Err(_) => {}
        Ok(()) => panic!("a launch without a GPU cannot succeed"),
    }
    let empty = DeviceWindows {
        seq_lens_host: &[],
        live_starts_host: &[],
        ..good_windows()
    };
    let none = DeviceSample {
        num_evict_host: &[],
        scores: DeviceArray::new(0, 0),
        ..good_batch()
    };
    assert!(launch(&empty, &none, DeviceArray::new(0, 0)).is_ok());
}
