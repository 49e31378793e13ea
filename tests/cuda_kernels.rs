//! The CUDA eviction kernels against their CPU references on the same random paged caches. The
//! comparisons are `#[ignore]`d (they need a CUDA GPU) and run by scripts/gpu_check.sh with
//! `--ignored`; the argument checks run everywhere.
#![allow(clippy::needless_range_loop)]

mod kernels_support;

use foresightkv::cuda::{
    launch_compact, launch_paged_attention_decode, launch_scorer_mlp, launch_select_survivors,
    launch_window_stats_folded, plan_decode, window_stats_workspace_len, CudaError, DeviceArray,
    DeviceBuffer, DeviceCache, DeviceScorerWeights, DeviceWindows, PagedLaunch,
};
use foresightkv::kernels::{DecodeArgs, KernelError, SelectArgs, WindowStatsArgs};
use foresightkv::Element;
use half::{bf16, f16};
use kernels_support::{
    assert_close, assert_same_bits, eps, require_gpu, runner, shapes, CacheKind, Scenario,
    ScorerCase, SelectCase, Shape,
};

/// A launch on device 0, legacy default stream.
fn on_device_0<'a>(
    dtype: foresightkv::DType,
    kv: &'a foresightkv::kernels::PagedKvLayout,
    cache: DeviceCache,
    windows: &'a DeviceWindows<'a>,
) -> PagedLaunch<'a> {
    PagedLaunch::new((0, 0), dtype, kv, cache, windows)
}

fn up<T: bytemuck::Pod>(data: &[T]) -> DeviceBuffer {
    DeviceBuffer::from_host(0, data).expect("upload")
}

fn arr(b: &DeviceBuffer, len: usize) -> DeviceArray {
    DeviceArray::new(b.ptr(), len)
}

/// A scenario's cache and windows on the device.
struct Dev {
    key: DeviceBuffer,
    value: Option<DeviceBuffer>,
    tables: DeviceBuffer,
    lens: DeviceBuffer,
    starts: DeviceBuffer,
}

impl Dev {
    fn new<T: Element + bytemuck::Pod>(sc: &Scenario<T>) -> Self {
        Self {
            key: up(&sc.key),
            value: (!sc.shape.kind.is_fused()).then(|| up(&sc.value)),
            tables: up(&sc.block_tables),
            lens: up(&sc.seq_lens),
            starts: up(&sc.live_starts),
        }
    }
    fn cache<T: Element>(&self, sc: &Scenario<T>) -> DeviceCache {
        let key = DeviceArray::new(self.key.ptr(), sc.key.len());
        let value = match &self.value {
            Some(v) => DeviceArray::new(v.ptr(), sc.value.len()),
            None => {
                let off = sc.kv.value_offset();
                DeviceArray::new(
                    self.key.ptr() + (off * std::mem::size_of::<T>()) as u64,
                    sc.key.len() - off,
                )
            }
        };
        DeviceCache { key, value }
    }
    fn windows<'a, T: Element>(&self, sc: &'a Scenario<T>) -> DeviceWindows<'a> {
        DeviceWindows {
            block_tables: self.tables.ptr(),
            seq_lens: self.lens.ptr(),
            live_starts: self.starts.ptr(),
            block_table_stride: sc.bt_stride,
            seq_lens_host: &sc.seq_lens,
            live_starts_host: &sc.live_starts,
        }
    }
}

fn to_f32<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn decode_case<T: Element + bytemuck::Pod>(shape: Shape) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, hq, hd) = (sc.seq_lens.len(), sc.num_q_heads(), sc.shape.head_dim);
    let args = DecodeArgs::contiguous(hq as i64, hd as i64);
    let query = sc.random_t(n * hq * hd, 2.0);
    let mut want = vec![T::default(); n * hq * hd];
    sc.decode(&sc.windows(), &args, &query, &mut want);
    let dev = Dev::new(&sc);
    let plan = plan_decode(&sc.kv, hq as i64, n, sc.max_live()).unwrap();
    let (q, out) = (
        up(&query),
        DeviceBuffer::zeros(0, want.len() * std::mem::size_of::<T>()).unwrap(),
    );
    let ws = DeviceBuffer::zeros(0, plan.workspace_len.max(1) * 4).unwrap();
    unsafe {
        launch_paged_attention_decode(
            &on_device_0(T::DTYPE, &sc.kv, dev.cache(&sc), &dev.windows(&sc)),
            &args,
            arr(&q, query.len()),
            arr(&out, want.len()),
            arr(&ws, plan.workspace_len),
        )
        .unwrap();
    }
    let got: Vec<T> = out.to_host().unwrap();
    let tol = 1e-5 + 4.0 * eps::<T>();
    assert_close(
        &format!("decode {:?}", sc.shape.kind),
        &to_f32(&got),
        &to_f32(&want),
        tol,
        tol,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_decode_matches_reference() {
    require_gpu();
    // Long windows exercise the split-KV merge (partitions of at most 512 slots).
    let strat = shapes(vec![64, 128, 256], 1300, 0);
    runner(12)
        .run(&strat, |s| {
            decode_case::<f32>(s.clone());
            decode_case::<f16>(s.clone());
            decode_case::<bf16>(s);
            Ok(())
        })
        .unwrap();
}

fn window_stats_case<T: Element + bytemuck::Pod>(shape: Shape, max_queries: usize) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, hq) = (sc.seq_lens.len(), sc.num_q_heads());
    // Random statistics window (0 = every row) and mode: the fold and the official sums too.
    let (num_queries, args, queries) = sc.random_window_stats(max_queries);
    let (layout, stats) = sc.random_stats();
    let mut want = stats.clone();
    sc.window_stats(&args, &queries, &num_queries, &layout, &mut want);
    let dev = Dev::new(&sc);
    let (q, nq, st) = (up(&queries), up(&num_queries), up(&stats));
    let wl = window_stats_workspace_len(n, hq, max_queries, sc.max_live());
    let ws = DeviceBuffer::zeros(0, wl * 4).unwrap();
    unsafe {
        launch_window_stats_folded(
            &on_device_0(T::DTYPE, &sc.kv, dev.cache(&sc), &dev.windows(&sc)),
            &args,
            arr(&q, queries.len()),
            arr(&nq, n),
            &num_queries,
            None,
            &layout,
            arr(&st, stats.len()),
            arr(&ws, wl),
        )
        .unwrap();
    }
    let got: Vec<f32> = st.to_host().unwrap();
    assert_close("window_stats", &got, &want, 2e-5, 2e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_window_stats_matches_reference() {
    require_gpu();
    let strat = (shapes(vec![64, 128, 256], 150, 1), 1usize..140);
    runner(12)
        .run(&strat, |(s, mq)| {
            window_stats_case::<f32>(s.clone(), mq);
            window_stats_case::<bf16>(s.clone(), mq);
            window_stats_case::<f16>(s, mq);
            Ok(())
        })
        .unwrap();
}

fn scorer_case<T: Element + bytemuck::Pod>(shape: Shape) {
    let mut sc = Scenario::<T>::new(shape);
    let case = ScorerCase::new(&mut sc, |_| 0.1);
    let (layout, stats) = (&case.layout, &case.stats);
    let (w1, b1, w2, b2) = (&case.w1, &case.b1, &case.w2, &case.b2);
    let max_live = sc.max_live() + 3;
    let want = case.reference(&sc, max_live, -1.5);
    let dev = Dev::new(&sc);
    let (st, dw1, db1, dw2, db2) = (up(stats), up(w1), up(b1), up(w2), up(b2));
    let scores = up(&vec![-1.5f32; want.len()]);
    let dweights = DeviceScorerWeights {
        w1: arr(&dw1, w1.len()),
        b1: arr(&db1, b1.len()),
        w2: arr(&dw2, w2.len()),
        b2: arr(&db2, b2.len()),
    };
    unsafe {
        launch_scorer_mlp(
            &on_device_0(T::DTYPE, &sc.kv, dev.cache(&sc), &dev.windows(&sc)),
            layout,
            arr(&st, stats.len()),
            dweights,
            max_live as i64,
            arr(&scores, want.len()),
        )
        .unwrap();
    }
    let got: Vec<f32> = scores.to_host().unwrap();
    assert_close("scores", &got, &want, 1e-4, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_scorer_matches_reference() {
    require_gpu();
    runner(12)
        .run(&shapes(vec![64, 128, 256], 200, 0), |s| {
            scorer_case::<f32>(s.clone());
            scorer_case::<bf16>(s);
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_select_matches_reference() {
    require_gpu();
    let strat = (
        shapes(vec![64], 900, 0),
        0usize..40,
        0.0f64..=1.0,
        proptest::bool::ANY,
    );
    runner(16)
        .run(&strat, |(shape, protected, frac, ties)| {
            let mut sc = Scenario::<f32>::new(shape);
            let n = sc.seq_lens.len();
            let case = SelectCase::new(&mut sc, protected, frac, ties);
            let (scores, num_evict, args) = (&case.scores, &case.num_evict, &case.args);
            let want = case.reference(&sc, -3);
            let dev = Dev::new(&sc);
            let (ds, de, dsv) = (up(scores), up(num_evict), up(&vec![-3i32; scores.len()]));
            unsafe {
                launch_select_survivors(
                    0,
                    0,
                    &dev.windows(&sc),
                    args,
                    arr(&ds, scores.len()),
                    arr(&de, n),
                    num_evict,
                    arr(&dsv, scores.len()),
                )
                .unwrap();
            }
            let got: Vec<i32> = dsv.to_host().unwrap();
            assert_eq!(got, want);
            Ok(())
        })
        .unwrap();
}

fn compact_case<T: Element + bytemuck::Pod>(shape: Shape, with_stats: bool) {
    let mut sc = Scenario::<T>::new(shape);
    let n = sc.seq_lens.len();
    let max_live = sc.max_live();
    let (num_evict, survivors, _) = sc.random_compaction();
    let (layout, stats) = sc.random_stats();
    let dev = Dev::new(&sc);
    let (dsv, de, dst) = (up(&survivors), up(&num_evict), up(&stats));
    let cache = dev.cache(&sc);
    unsafe {
        launch_compact(
            &on_device_0(T::DTYPE, &sc.kv, cache, &dev.windows(&sc)),
            max_live as i64,
            arr(&de, n),
            &num_evict,
            arr(&dsv, survivors.len()),
            with_stats.then(|| (&layout, arr(&dst, stats.len()))),
        )
        .unwrap();
    }
    let got_key: Vec<T> = dev.key.to_host().unwrap();
    let got_value: Vec<T> = match &dev.value {
        Some(v) => v.to_host().unwrap(),
        None => Vec::new(),
    };
    let got_stats: Vec<f32> = dst.to_host().unwrap();
    let mut want_stats = stats.clone();
    let st = with_stats.then_some((&layout, &mut want_stats[..]));
    sc.compact(max_live, &num_evict, &survivors, st);
    assert!(
        got_key == sc.key,
        "key cache differs from the reference compaction"
    );
    assert!(
        got_value == sc.value,
        "value cache differs from the reference compaction"
    );
    assert_same_bits("stats differ", &got_stats, &want_stats);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_compact_matches_reference() {
    require_gpu();
    runner(16)
        .run(
            &(shapes(vec![64, 128, 256], 600, 0), proptest::bool::ANY),
            |(s, with_stats)| {
                compact_case::<f16>(s.clone(), with_stats);
                compact_case::<f32>(s.clone(), with_stats);
                compact_case::<bf16>(s, true);
                Ok(())
            },
        )
        .unwrap();
}

/// The argument error of a launch that must be refused.
fn kerr<T>(r: Result<T, CudaError>) -> KernelError {
    match r {
        Err(CudaError::Kernel(e)) => e,
        Err(e) => panic!("expected a kernel argument error, got {e}"),
        Ok(_) => panic!("expected a kernel argument error, got Ok"),
    }
}

/// Bad arguments are refused before any launch, with or without a GPU (validation needs none).
#[test]
fn launchers_reject_bad_arguments_before_launch() {
    let sc = Scenario::<f32>::new(Shape {
        kv_heads: 2,
        group: 2,
        head_dim: 64,
        block_size: 16,
        kind: CacheKind::Contiguous,
        live_lens: vec![20, 3],
        start_blocks: vec![1, 0],
        seed: 7,
    });
    let lens_short = [sc.seq_lens[0]];
    let fake = |len: usize| DeviceArray::new(0x1000, len);
    let cache = DeviceCache {
        key: fake(sc.key.len()),
        value: fake(sc.value.len()),
    };
    let windows = DeviceWindows {
        block_tables: 0x2000,
        seq_lens: 0x3000,
        live_starts: 0x4000,
        block_table_stride: sc.bt_stride,
        seq_lens_host: &sc.seq_lens,
        live_starts_host: &sc.live_starts,
    };
    let args = DecodeArgs::contiguous(4, 64);
    let dec = |cache: DeviceCache, w: &DeviceWindows<'_>, q: DeviceArray, ws: DeviceArray| unsafe {
        launch_paged_attention_decode(
            &on_device_0(foresightkv::DType::F32, &sc.kv, cache, w),
            &args,
            q,
            fake(2 * 4 * 64),
            ws,
        )
    };
    assert!(matches!(
        kerr(dec(
            cache,
            &windows,
            DeviceArray::new(0, 2 * 4 * 64),
            fake(0)
        )),
        KernelError::NullPointer("query")
    ));
    assert!(matches!(
        kerr(dec(cache, &windows, fake(10), fake(0))),
        KernelError::BufferTooSmall { name: "query", .. }
    ));
    let bad_cache = DeviceCache {
        key: DeviceArray::new(0, sc.key.len()),
        ..cache
    };
    assert!(matches!(
        kerr(dec(bad_cache, &windows, fake(512), fake(0))),
        KernelError::NullPointer("key_cache")
    ));
    let short = DeviceWindows {
        seq_lens_host: &lens_short,
        ..windows
    };
    assert!(matches!(
        kerr(dec(cache, &short, fake(512), fake(0))),
        KernelError::ShapeMismatch(_)
    ));
    let beyond_lens = [sc.seq_lens[0] + 64, sc.seq_lens[1]];
    let beyond = DeviceWindows {
        seq_lens_host: &beyond_lens,
        ..windows
    };
    assert!(matches!(
        kerr(dec(cache, &beyond, fake(512), fake(0))),
        KernelError::LengthBeyondBlockTable { .. }
    ));
    let mut odd = sc.kv;
    odd.head_dim = 96;
    odd.key_strides = [16 * 2 * 96, 2 * 96, 96];
    odd.value_strides = odd.key_strides;
    let big = DeviceCache {
        key: fake(1 << 20),
        value: fake(1 << 20),
    };
    let r = unsafe {
        launch_paged_attention_decode(
            &on_device_0(foresightkv::DType::F32, &odd, big, &windows),
            &DecodeArgs::contiguous(4, 96),
            fake(768),
            fake(768),
            fake(0),
        )
    };
    assert!(matches!(
        kerr(r),
        KernelError::InvalidSize {
            name: "head_dim",
            ..
        }
    ));
    let sel = SelectArgs {
        num_kv_heads: 2,
        max_live: 20,
        num_protected: 4,
    };
    let r = unsafe {
        launch_select_survivors(0, 0, &windows, &sel, fake(80), fake(2), &[17, 0], fake(80))
    };
    assert!(matches!(
        kerr(r),
        KernelError::InvalidArgument {
            name: "num_evict",
            ..
        }
    ));
    let r = unsafe {
        launch_select_survivors(
            0,
            0,
            &windows,
            &sel,
            fake(80),
            DeviceArray::new(0, 2),
            &[1, 0],
            fake(80),
        )
    };
    assert!(matches!(kerr(r), KernelError::NullPointer("num_evict")));
    let r = unsafe {
        launch_compact(
            &on_device_0(foresightkv::DType::F32, &sc.kv, cache, &windows),
            20,
            fake(2),
            &[8, 0],
            fake(80),
            None,
        )
    };
    assert!(matches!(
        kerr(r),
        KernelError::InvalidArgument {
            name: "num_evict",
            ..
        }
    ));
    let wargs = WindowStatsArgs::contiguous(4, 8, 64);
    let layout = foresightkv::kernels::StatsLayout::contiguous(sc.kv.num_blocks, 16, 2, 2);
    let stats_len = layout.strides[0] as usize * layout.num_blocks as usize;
    let r = unsafe {
        launch_window_stats_folded(
            &on_device_0(foresightkv::DType::F32, &sc.kv, cache, &windows),
            &wargs,
            fake(2 * 8 * 4 * 64),
            fake(2),
            &[4, 2],
            None,
            &layout,
            fake(stats_len),
            fake(1),
        )
    };
    assert!(matches!(
        kerr(r),
        KernelError::BufferTooSmall {
            name: "workspace",
            ..
        }
    ));
}
