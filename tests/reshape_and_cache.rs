//! reshape_and_cache: the CPU reference against a naive per-element computation, its argument
//! validation, and the CUDA kernel (through its op) against the CPU reference on a GPU (`#[ignore]`d:
//! scripts/gpu_check.sh runs it).

use foresightkv::cuda::{CudaError, DeviceBuffer};
use foresightkv::kernels::{reshape_and_cache, CacheWriteLayout, KernelError};
use foresightkv::ops::reshape_and_cache::reshape_and_cache as op_reshape_and_cache;
use foresightkv::ops::{Buf, Cache, OpError, Place};
use foresightkv::{DType, Element};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random problem: layout (contiguous or vLLM's head-major cache), inputs, distinct slots with padding.
#[derive(Debug, Clone)]
struct Case {
    layout: CacheWriteLayout,
    key: Vec<f32>,
    value: Vec<f32>,
    slots: Vec<i64>,
    cache_len: usize,
}

fn make_case(
    seed: u64,
    tokens: i64,
    heads: i64,
    hd: i64,
    bs: i64,
    blocks: i64,
    head_major: bool,
) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut layout = CacheWriteLayout::contiguous(tokens, heads, hd, bs, blocks);
    if head_major {
        // vLLM-style [num_blocks, kv_heads, block_size, head_dim].
        let s = [bs * heads * hd, hd, bs * hd];
        layout.cache.key_strides = s;
        layout.cache.value_strides = s;
    }
    // Padded input rows: stride larger than the packed row.
    layout.key_strides = [heads * hd + 3, hd];
    let n = (tokens * (heads * hd + 3)) as usize;
    let key: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
    let value: Vec<f32> = (0..(tokens * heads * hd) as usize)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let capacity = bs * blocks;
    let mut all: Vec<i64> = (0..capacity).collect();
    for i in (1..all.len()).rev() {
        let j = rng.random_range(0..=i);
        all.swap(i, j);
    }
    let slots = (0..tokens as usize)
        .map(|i| {
            if rng.random_range(0..8) == 0 {
                -1
            } else {
                all[i]
            }
        })
        .collect();
    Case {
        layout,
        key,
        value,
        slots,
        cache_len: (capacity * heads * hd) as usize,
    }
}

/// The naive semantics: position by position, indexing the caches by their logical coordinates.
fn naive(case: &Case) -> (Vec<f32>, Vec<f32>) {
    let l = &case.layout;
    let mut kc = vec![0f32; case.cache_len];
    let mut vc = vec![0f32; case.cache_len];
    for (t, &slot) in case.slots.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        for h in 0..l.cache.num_kv_heads {
            for d in 0..l.cache.head_dim {
                let (b, o) = (slot / l.cache.block_size, slot % l.cache.block_size);
                let t = t as i64;
                let kdst = b * l.cache.key_strides[0]
                    + o * l.cache.key_strides[1]
                    + h * l.cache.key_strides[2]
                    + d;
                let vdst = b * l.cache.value_strides[0]
                    + o * l.cache.value_strides[1]
                    + h * l.cache.value_strides[2]
                    + d;
                kc[kdst as usize] =
                    case.key[(t * l.key_strides[0] + h * l.key_strides[1] + d) as usize];
                vc[vdst as usize] =
                    case.value[(t * l.value_strides[0] + h * l.value_strides[1] + d) as usize];
            }
        }
    }
    (kc, vc)
}

fn run_cpu<T: Element>(case: &Case) -> Result<(Vec<T>, Vec<T>), KernelError> {
    let key: Vec<T> = case.key.iter().map(|&x| T::from_f32(x)).collect();
    let value: Vec<T> = case.value.iter().map(|&x| T::from_f32(x)).collect();
    let mut kc = vec![T::default(); case.cache_len];
    let mut vc = vec![T::default(); case.cache_len];
    reshape_and_cache(&case.layout, &key, &value, &mut kc, &mut vc, &case.slots)?;
    Ok((kc, vc))
}

fn rounded<T: Element>(xs: &[f32]) -> Vec<f32> {
    xs.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("FORESIGHTKV_PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(128)))]

    #[test]
    fn cpu_reference_matches_naive(
        seed in any::<u64>(), tokens in 0i64..40, heads in 1i64..5,
        hd in prop::sample::select(vec![1i64, 8, 64, 128]), bs in prop::sample::select(vec![1i64, 16]),
        extra_blocks in 0i64..4, head_major in any::<bool>(),
    ) {
        let blocks = (tokens + bs - 1) / bs + extra_blocks + 1;
        let case = make_case(seed, tokens, heads, hd, bs, blocks, head_major);
        let (nk, nv) = naive(&case);
        let (k32, v32) = run_cpu::<f32>(&case).unwrap();
        prop_assert_eq!(&k32, &nk);
        prop_assert_eq!(&v32, &nv);
        let (k16, v16) = run_cpu::<f16>(&case).unwrap();
        prop_assert_eq!(k16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), rounded::<f16>(&nk));
        prop_assert_eq!(v16.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), rounded::<f16>(&nv));
        let (kb, vb) = run_cpu::<bf16>(&case).unwrap();
        prop_assert_eq!(kb.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), rounded::<bf16>(&nk));
        prop_assert_eq!(vb.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), rounded::<bf16>(&nv));
    }
}

#[test]
fn rejects_bad_arguments_before_writing() {
    let case = make_case(7, 4, 2, 8, 16, 2, false);
    let mut bad = case.clone();
    bad.slots[2] = 32; // capacity is 2 * 16
    let err = run_cpu::<f32>(&bad).unwrap_err();
    assert_eq!(
        err,
        KernelError::SlotOutOfRange {
            index: 2,
            slot: 32,
            capacity: 32
        }
    );

    let mut short = case.clone();
    short.cache_len -= 1;
    assert!(matches!(
        run_cpu::<f32>(&short),
        Err(KernelError::BufferTooSmall {
            name: "key_cache",
            ..
        })
    ));

    let mut zero = case.clone();
    zero.layout.cache.head_dim = 0;
    assert!(matches!(
        run_cpu::<f32>(&zero),
        Err(KernelError::InvalidSize {
            name: "head_dim",
            value: 0,
            ..
        })
    ));

    let mut neg = case.clone();
    neg.layout.key_strides[0] = -5;
    assert!(matches!(
        run_cpu::<f32>(&neg),
        Err(KernelError::InvalidStride {
            name: "key",
            value: -5,
            ..
        })
    ));

    let mut overlap = case.clone();
    overlap.layout.cache.value_strides[2] = 3;
    assert!(matches!(
        run_cpu::<f32>(&overlap),
        Err(KernelError::InvalidStride {
            name: "value_cache",
            ..
        })
    ));

    let mut fewer = case.clone();
    fewer.slots.pop();
    assert!(matches!(
        run_cpu::<f32>(&fewer),
        Err(KernelError::ShapeMismatch(_))
    ));

    let mut huge = case;
    huge.layout.cache.num_blocks = 1 << 50;
    assert!(matches!(
        run_cpu::<f32>(&huge),
        Err(KernelError::InvalidSize {
            name: "num_blocks",
            ..
        })
    ));
}

/// The case's buffers at `addrs` (key, value, key cache, value cache, slot mapping), as the op takes them.
fn bufs(case: &Case, addrs: [u64; 5]) -> (Cache, Buf, Buf, Buf) {
    let cache = Cache {
        key: Buf::new(addrs[2], case.cache_len),
        value: Buf::new(addrs[3], case.cache_len),
        fused: false,
    };
    (
        cache,
        Buf::new(addrs[0], case.key.len()),
        Buf::new(addrs[1], case.value.len()),
        Buf::new(addrs[4], case.slots.len()),
    )
}

/// Runs the CUDA kernel on device 0 through the op and returns the caches as f32.
fn run_gpu<T: Element + bytemuck::Pod>(case: &Case) -> Result<(Vec<f32>, Vec<f32>), OpError> {
    let key: Vec<T> = case.key.iter().map(|&x| T::from_f32(x)).collect();
    let value: Vec<T> = case.value.iter().map(|&x| T::from_f32(x)).collect();
    let dk = DeviceBuffer::from_host(0, &key)?;
    let dv = DeviceBuffer::from_host(0, &value)?;
    let dkc = DeviceBuffer::zeros(0, case.cache_len * T::DTYPE.size())?;
    let dvc = DeviceBuffer::zeros(0, case.cache_len * T::DTYPE.size())?;
    let ds = DeviceBuffer::from_host(0, &case.slots)?;
    let (cache, k, v, sm) = bufs(case, [dk.ptr(), dv.ptr(), dkc.ptr(), dvc.ptr(), ds.ptr()]);
    let at = Place::Cuda {
        ordinal: 0,
        stream: 0,
    };
    // SAFETY: every buffer was allocated on device 0 with the lengths given.
    unsafe { op_reshape_and_cache(at, T::DTYPE, &case.layout, cache, k, v, sm)? };
    let to_f32 = |v: Vec<T>| v.into_iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    Ok((to_f32(dkc.to_host::<T>()?), to_f32(dvc.to_host::<T>()?)))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_cpu_reference_on_random_shapes() {
    assert!(
        foresightkv::cuda::runtime::gpu_available(),
        "this GPU test cannot run: no CUDA GPU visible"
    );
    for seed in 0..24u64 {
        let (tokens, heads, hd, bs) = (
            1 + (seed as i64 * 7) % 37,
            1 + seed as i64 % 4,
            [64, 128, 256][seed as usize % 3],
            [1, 16][seed as usize % 2],
        );
        let case = make_case(seed, tokens, heads, hd, bs, tokens / bs + 3, seed % 2 == 0);
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            let (gk, gv) = match dtype {
                DType::F32 => run_gpu::<f32>(&case),
                DType::F16 => run_gpu::<f16>(&case),
                DType::Bf16 => run_gpu::<bf16>(&case),
            }
            .unwrap_or_else(|e| panic!("seed {seed} {dtype}: {e}"));
            let (ck, cv) = naive(&case);
            let (ck, cv) = match dtype {
                DType::F32 => (ck, cv),
                DType::F16 => (rounded::<f16>(&ck), rounded::<f16>(&cv)),
                DType::Bf16 => (rounded::<bf16>(&ck), rounded::<bf16>(&cv)),
            };
            assert_eq!(gk, ck, "key cache, seed {seed} {dtype}");
            assert_eq!(gv, cv, "value cache, seed {seed} {dtype}");
        }
    }
}

/// Without kernels (no nvcc at build time), without a GPU, or on a device that does not exist, a
/// CUDA call is a typed error, not a crash.
#[test]
fn cuda_call_without_kernels_or_gpu_is_a_typed_error() {
    let case = make_case(1, 4, 2, 8, 16, 2, false);
    let (cache, k, v, sm) = bufs(&case, [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]);
    let on = |ordinal| Place::Cuda { ordinal, stream: 0 };
    // SAFETY: device 4096 does not exist (and without kernels or a driver nothing is reached), so
    // the fake addresses are never used.
    let launch = |layout: &CacheWriteLayout| unsafe {
        op_reshape_and_cache(on(4096), DType::F32, layout, cache, k, v, sm)
    };
    let err = launch(&case.layout).unwrap_err();
    let expect_no_kernels = std::env::var("FORESIGHTKV_EXPECT_NO_KERNELS").is_ok_and(|v| v == "1");
    if expect_no_kernels {
        assert!(
            matches!(err, OpError::Cuda(CudaError::KernelsNotCompiled)),
            "{err}"
        );
        assert!(err.to_string().contains("not compiled"), "{err}");
        assert!(matches!(
            DeviceBuffer::zeros(0, 16),
            Err(CudaError::KernelsNotCompiled)
        ));
    } else {
        assert!(
            matches!(
                err,
                OpError::Cuda(
                    CudaError::KernelsNotCompiled
                        | CudaError::NoDriver
                        | CudaError::NoSuchDevice { .. }
                )
            ),
            "{err}"
        );
    }
    // Invalid layouts are refused before the runtime is even asked.
    let mut bad = case.layout;
    bad.cache.num_kv_heads = -1;
    let err = launch(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            OpError::Kernel(KernelError::InvalidSize {
                name: "num_kv_heads",
                ..
            })
        ),
        "{err}"
    );
}
