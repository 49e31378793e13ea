//! Bad arguments to the eviction kernels' CPU references return typed errors before any write.

use foresightkv::kernels::{
    compact, paged_attention_decode, scorer_mlp, select_survivors, window_stats, DecodeArgs,
    KernelError, KvCacheMut, LiveWindows, PagedKvLayout, ScorerWeights, SelectArgs, StatsLayout,
    WindowStatsArgs,
};

const HD: i64 = 16;

/// Whether `r` is the `InvalidArgument` error of argument `want`.
fn invalid<T>(r: Result<T, KernelError>, want: &str) -> bool {
    matches!(r, Err(KernelError::InvalidArgument { name, .. }) if name == want)
}

/// Whether `r` is the `BufferTooSmall` error of buffer `want`.
fn too_small<T>(r: Result<T, KernelError>, want: &str) -> bool {
    matches!(r, Err(KernelError::BufferTooSmall { name, .. }) if name == want)
}

/// Two sequences (lengths 20 and 5, live from 16 and 0) over 4 blocks of 16, one KV head.
struct Fixture {
    kv: PagedKvLayout,
    key: Vec<f32>,
    value: Vec<f32>,
    tables: Vec<i32>,
    lens: Vec<i32>,
    starts: Vec<i32>,
}

impl Fixture {
    fn new() -> Self {
        let kv = PagedKvLayout::contiguous(4, 16, 1, HD);
        let n = kv.extent(&kv.key_strides);
        Self {
            kv,
            key: vec![0.5; n],
            value: vec![0.25; n],
            tables: vec![-1, 2, 0, -1],
            lens: vec![20, 5],
            starts: vec![16, 0],
        }
    }
    fn windows(&self) -> LiveWindows<'_> {
        LiveWindows {
            block_tables: &self.tables,
            block_table_stride: 2,
            seq_lens: &self.lens,
            live_starts: &self.starts,
        }
    }
    fn decode(&self, args: &DecodeArgs) -> Result<Vec<f32>, KernelError> {
        let q = vec![1.0f32; 2 * args.num_q_heads as usize * HD as usize];
        let mut out = vec![f32::NAN; q.len()];
        paged_attention_decode(
            &self.kv,
            &self.windows(),
            args,
            &q,
            &self.key,
            &self.value,
            &mut out,
        )
        .map(|_| out)
    }
}

#[test]
fn fixture_is_valid() {
    let f = Fixture::new();
    let out = f.decode(&DecodeArgs::contiguous(2, HD)).unwrap();
    assert!(out.iter().all(|&x| (x - 0.25).abs() < 1e-6));
}

#[test]
fn decode_rejects_bad_shapes() {
    let mut f = Fixture::new();
    let mut a = DecodeArgs::contiguous(2, HD);
    a.scale = f32::NAN;
    assert!(invalid(f.decode(&a), "scale"));
    let mut a = DecodeArgs::contiguous(2, HD);
    a.query_strides = [2 * HD, 4];
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::InvalidStride { name: "query", .. })
    ));
    let mut a = DecodeArgs::contiguous(2, HD);
    a.out_strides = [0, HD];
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::InvalidStride { name: "out", .. })
    ));
    f.key.truncate(10);
    assert!(too_small(
        f.decode(&DecodeArgs::contiguous(2, HD)),
        "key_cache"
    ));
}

#[test]
fn decode_rejects_bad_windows() {
    let a = DecodeArgs::contiguous(2, HD);
    let mut f = Fixture::new();
    f.lens[1] = 40;
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::LengthBeyondBlockTable {
            seq: 1,
            len: 40,
            capacity: 32
        })
    ));
    let mut f = Fixture::new();
    f.starts[0] = 8;
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::BadWindow { seq: 0, .. })
    ));
    let mut f = Fixture::new();
    f.starts[1] = 6;
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::BadWindow { seq: 1, .. })
    ));
    let mut f = Fixture::new();
    f.tables[1] = 4;
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::BlockOutOfRange {
            seq: 0,
            index: 1,
            block: 4,
            ..
        })
    ));
    let mut f = Fixture::new();
    f.tables[2] = -1;
    assert!(matches!(
        f.decode(&a),
        Err(KernelError::BlockOutOfRange {
            seq: 1,
            index: 0,
            ..
        })
    ));
    let mut f = Fixture::new();
    f.starts.pop();
    assert!(matches!(f.decode(&a), Err(KernelError::ShapeMismatch(_))));
    let mut f = Fixture::new();
    f.kv.num_kv_heads = 2;
    f.kv.key_strides = [16 * 2 * HD, 2 * HD, HD];
    f.kv.value_strides = f.kv.key_strides;
    f.key.resize(2 * f.key.len(), 0.5);
    f.value.resize(2 * f.value.len(), 0.25);
    assert!(matches!(
        f.decode(&DecodeArgs::contiguous(3, HD)),
        Err(KernelError::ShapeMismatch(_))
    ));
}

#[test]
fn window_stats_rejects_bad_arguments() {
    let f = Fixture::new();
    let args = WindowStatsArgs::contiguous(2, 4, HD);
    let q = vec![0.1f32; 2 * 4 * 2 * HD as usize];
    let layout = StatsLayout::contiguous(4, 16, 1, 2);
    let mut stats = vec![0f32; 4 * 16 * 16];
    let run = |nq: &[i32], layout: &StatsLayout, stats: &mut [f32], args: &WindowStatsArgs| {
        window_stats(&f.kv, &f.windows(), args, &q, nq, &f.key, layout, stats)
    };
    run(&[4, 2], &layout, &mut stats, &args).unwrap();
    assert!(invalid(
        run(&[5, 2], &layout, &mut stats, &args),
        "num_queries"
    ));
    assert!(invalid(
        run(&[4, 6], &layout, &mut stats, &args),
        "num_queries"
    ));
    assert!(matches!(
        run(&[4], &layout, &mut stats, &args),
        Err(KernelError::ShapeMismatch(_))
    ));
    assert!(too_small(
        run(&[1, 1], &layout, &mut stats[..100], &args),
        "stats"
    ));
    let wrong_group = StatsLayout::contiguous(4, 16, 1, 4);
    let mut big = vec![0f32; 4 * 16 * 32];
    assert!(matches!(
        run(&[1, 1], &wrong_group, &mut big, &args),
        Err(KernelError::ShapeMismatch(_))
    ));
    let wrong_block = StatsLayout::contiguous(4, 8, 1, 2);
    assert!(matches!(
        run(&[1, 1], &wrong_block, &mut stats, &args),
        Err(KernelError::ShapeMismatch(_))
    ));
    let mut short = args;
    short.max_queries = 8;
    assert!(too_small(
        run(&[1, 1], &layout, &mut stats, &short),
        "queries"
    ));
}

#[test]
fn scorer_rejects_bad_weights_and_scores() {
    let f = Fixture::new();
    let layout = StatsLayout::contiguous(4, 16, 1, 2);
    let stats = vec![0f32; 4 * 16 * 16];
    let in_dim = 2 * HD as usize + 16;
    let (w1, b1, w2, b2) = (
        vec![0.1f32; 16 * in_dim],
        vec![0f32; 16],
        vec![1f32; 16],
        vec![0f32; 1],
    );
    let mut scores = vec![0f32; 2 * 8];
    let ok = ScorerWeights {
        w1: &w1,
        b1: &b1,
        w2: &w2,
        b2: &b2,
    };
    let run = |weights: &ScorerWeights<'_>, max_live: i64, scores: &mut [f32]| {
        scorer_mlp(
            &f.kv,
            &f.windows(),
            &f.key,
            &f.value,
            &layout,
            &stats,
            weights,
            max_live,
            scores,
        )
    };
    run(&ok, 5, &mut scores[..10]).unwrap();
    let bad = ScorerWeights { w1: &w1[1..], ..ok };
    assert!(matches!(
        run(&bad, 5, &mut scores),
        Err(KernelError::ShapeMismatch(_))
    ));
    assert!(invalid(run(&ok, 4, &mut scores), "max_live"));
    assert!(too_small(run(&ok, 5, &mut scores[..9]), "scores"));
}

#[test]
fn select_rejects_bad_counts() {
    let (lens, starts) = (vec![20, 5], vec![16, 0]);
    let args = SelectArgs {
        num_kv_heads: 1,
        max_live: 5,
        num_protected: 2,
    };
    let scores = vec![0f32; 10];
    let mut out = vec![0i32; 10];
    select_survivors(&lens, &starts, &args, &scores, &[2, 3], &mut out).unwrap();
    assert_eq!(&out[..2], &[2, 3]);
    assert!(invalid(
        select_survivors(&lens, &starts, &args, &scores, &[3, 0], &mut out),
        "num_evict"
    ));
    assert!(invalid(
        select_survivors(&lens, &starts, &args, &scores, &[-1, 0], &mut out),
        "num_evict"
    ));
    assert!(matches!(
        select_survivors(&lens, &starts, &args, &scores, &[0], &mut out),
        Err(KernelError::ShapeMismatch(_))
    ));
    assert!(matches!(
        select_survivors(&lens, &[16, 6], &args, &scores, &[0, 0], &mut out),
        Err(KernelError::BadWindow { seq: 1, .. })
    ));
    let neg = SelectArgs {
        num_protected: -1,
        ..args
    };
    assert!(invalid(
        select_survivors(&lens, &starts, &neg, &scores, &[0, 0], &mut out),
        "num_protected"
    ));
}

#[test]
fn compact_rejects_bad_survivors_and_counts() {
    let mut f = Fixture::new();
    let kv = f.kv;
    let (tables, lens, starts) = (vec![-1, 2, 0, 1], vec![20, 17], vec![16, 0]);
    let w = LiveWindows {
        block_tables: &tables,
        block_table_stride: 2,
        seq_lens: &lens,
        live_starts: &starts,
    };
    let surv = vec![0i32; 2 * 17];
    let mut run = |evict: &[i32], surv: &[i32]| {
        compact(
            &kv,
            &w,
            17,
            evict,
            surv,
            KvCacheMut::Split {
                key: &mut f.key,
                value: &mut f.value,
            },
            None,
        )
    };
    // Sequence 1 keeps 1 of 17: survivor slot 16 is valid.
    let mut good = surv.clone();
    good[17] = 16;
    good[..4].copy_from_slice(&[0, 1, 2, 3]);
    run(&[0, 16], &good).unwrap();
    assert!(invalid(run(&[0, 8], &good), "num_evict"));
    assert!(invalid(run(&[0, 32], &good), "num_evict"));
    let mut unsorted = good.clone();
    unsorted[..4].copy_from_slice(&[0, 2, 1, 3]);
    assert!(invalid(run(&[0, 16], &unsorted), "survivors"));
    let mut beyond = good.clone();
    beyond[3] = 4;
    assert!(invalid(run(&[0, 16], &beyond), "survivors"));
    assert!(too_small(run(&[0, 16], &good[..20]), "survivors"));
}
