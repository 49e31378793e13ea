//! Random paged-cache scenarios shared by the kernel tests: a dense ground truth (per sequence, KV
//! head and live slot) scattered into a paged cache of a chosen layout, with garbage everywhere
//! the kernels must not read.
#![allow(dead_code)]

use foresightkv::kernels::{
    compact, paged_attention_decode, scorer_mlp, select_survivors, window_stats, DecodeArgs,
    KvCacheMut, LiveWindows, PagedKvLayout, ScorerWeights, SelectArgs, StatsLayout, StatsMode,
    WindowStatsArgs, NUM_STATS, SCORER_HIDDEN,
};
use foresightkv::Element;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The reason every GPU test is `#[ignore]`d with; scripts/gpu_check.sh runs them with `--ignored`.
pub const NEEDS_GPU: &str = "needs a CUDA GPU";

/// Fails the (ignored, explicitly requested) GPU test at once, saying why, when this build has no
/// kernels or no GPU is visible.
pub fn require_gpu() {
    if let Err(e) = foresightkv::cuda::embedded_fatbin() {
        panic!("this GPU test cannot run: {e}");
    }
    assert!(
        foresightkv::cuda::runtime::gpu_available(),
        "this GPU test cannot run: no CUDA GPU visible (driver missing or no device)"
    );
}

/// A proptest runner of `cases` cases that persists no failures.
pub fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// How the cache tensors are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Separate `[num_blocks, block_size, kv_heads, head_dim]` K and V.
    Contiguous,
    /// Separate `[num_blocks, kv_heads, block_size, head_dim]` K and V.
    HeadMajor,
    /// One `[num_blocks, kv_heads, block_size, 2 * head_dim]` tensor, K then V.
    Fused,
    /// One `[num_blocks, block_size, kv_heads, 2 * head_dim]` tensor, K then V.
    FusedTokenMajor,
    /// Contiguous with padding between blocks and tokens.
    Padded,
}

impl CacheKind {
    /// Whether K and V share one tensor (value view = key view + head_dim).
    pub fn is_fused(self) -> bool {
        matches!(self, CacheKind::Fused | CacheKind::FusedTokenMajor)
    }
}

/// The random choices a scenario is built from.
#[derive(Debug, Clone)]
pub struct Shape {
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub kind: CacheKind,
    /// Live length of each sequence.
    pub live_lens: Vec<usize>,
    /// Blocks before the live start of each sequence.
    pub start_blocks: Vec<usize>,
    pub seed: u64,
}

/// Strategy over shapes; `head_dims` lists the head dims to draw, `max_live` bounds live lengths.
pub fn shapes(
    head_dims: Vec<usize>,
    max_live: usize,
    min_live: usize,
) -> impl Strategy<Value = Shape> {
    (
        1usize..=3,
        prop::sample::select(vec![1usize, 2, 4]),
        prop::sample::select(head_dims),
        prop::sample::select(vec![1usize, 16]),
        prop::sample::select(vec![
            CacheKind::Contiguous,
            CacheKind::HeadMajor,
            CacheKind::Fused,
            CacheKind::FusedTokenMajor,
            CacheKind::Padded,
        ]),
        prop::collection::vec((min_live..=max_live, 0usize..3), 1..=3),
        any::<u64>(),
    )
        .prop_map(
            |(kv_heads, group, head_dim, block_size, kind, seqs, seed)| Shape {
                kv_heads,
                group,
                head_dim,
                block_size,
                kind,
                live_lens: seqs.iter().map(|s| s.0).collect(),
                start_blocks: seqs.iter().map(|s| s.1).collect(),
                seed,
            },
        )
}

/// A paged cache holding known dense contents.
pub struct Scenario<T> {
    pub shape: Shape,
    pub kv: PagedKvLayout,
    /// Key tensor (or the fused tensor).
    pub key: Vec<T>,
    /// Value tensor (empty for the fused layout).
    pub value: Vec<T>,
    pub block_tables: Vec<i32>,
    pub bt_stride: i64,
    pub seq_lens: Vec<i32>,
    pub live_starts: Vec<i32>,
    /// dense_k[s][kh][i] = key row of live slot i (values as stored in T).
    pub dense_k: Vec<Vec<Vec<Vec<f32>>>>,
    pub dense_v: Vec<Vec<Vec<Vec<f32>>>>,
    pub rng: ChaCha8Rng,
}

/// Uniform in [-scale, scale].
pub fn uniform(rng: &mut ChaCha8Rng, scale: f32) -> f32 {
    (rng.random::<f32>() * 2.0 - 1.0) * scale
}

impl<T: Element> Scenario<T> {
    /// Builds the paged cache for `shape`: blocks shuffled, freed blocks marked -1, garbage around.
    pub fn new(shape: Shape) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(shape.seed);
        let (bs, kvh, hd) = (shape.block_size, shape.kv_heads, shape.head_dim);
        let n = shape.live_lens.len();
        let seq_lens: Vec<i32> = (0..n)
            .map(|s| (shape.start_blocks[s] * bs + shape.live_lens[s]) as i32)
            .collect();
        let live_starts: Vec<i32> = (0..n)
            .map(|s| (shape.start_blocks[s] * bs) as i32)
            .collect();
        let blocks_of = |s: usize| (seq_lens[s] as usize).div_ceil(bs);
        let bt_stride = (0..n).map(blocks_of).max().unwrap_or(0) as i64 + 1;
        let live_blocks: usize = (0..n).map(|s| blocks_of(s) - shape.start_blocks[s]).sum();
        let num_blocks = live_blocks + 2;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            let j = rng.random_range(0..=i);
            ids.swap(i, j);
        }
        let mut next = ids.into_iter();
        let mut block_tables = vec![-1i32; n * bt_stride as usize];
        for s in 0..n {
            for b in shape.start_blocks[s]..blocks_of(s) {
                block_tables[s * bt_stride as usize + b] = next.next().expect("enough blocks");
            }
        }
        let nb = num_blocks as i64;
        let (bsi, kvi, hdi) = (bs as i64, kvh as i64, hd as i64);
        let kv = match shape.kind {
            CacheKind::Contiguous => PagedKvLayout::contiguous(nb, bsi, kvi, hdi),
            CacheKind::Fused => PagedKvLayout::fused_head_major(nb, bsi, kvi, hdi),
            CacheKind::HeadMajor => PagedKvLayout::head_major(nb, bsi, kvi, hdi),
            CacheKind::FusedTokenMajor => PagedKvLayout::fused_token_major(nb, bsi, kvi, hdi),
            CacheKind::Padded => {
                let tok = kvi * hdi + 8;
                let s = [bsi * tok + 24, tok, hdi];
                PagedKvLayout {
                    num_blocks: nb,
                    block_size: bsi,
                    num_kv_heads: kvi,
                    head_dim: hdi,
                    key_strides: s,
                    value_strides: s,
                }
            }
        };
        let garbage = |rng: &mut ChaCha8Rng, len: usize| -> Vec<T> {
            (0..len).map(|_| T::from_f32(uniform(rng, 50.0))).collect()
        };
        let (mut key, mut value) = if shape.kind.is_fused() {
            (
                garbage(&mut rng, kv.extent(&kv.key_strides) + hd),
                Vec::new(),
            )
        } else {
            (
                garbage(&mut rng, kv.extent(&kv.key_strides)),
                garbage(&mut rng, kv.extent(&kv.value_strides)),
            )
        };
        let mut dense_k = vec![vec![Vec::new(); kvh]; n];
        let mut dense_v = vec![vec![Vec::new(); kvh]; n];
        let voff = if shape.kind.is_fused() {
            kv.value_offset()
        } else {
            0
        };
        for s in 0..n {
            let w = LiveWindows {
                block_tables: &block_tables,
                block_table_stride: bt_stride,
                seq_lens: &seq_lens,
                live_starts: &live_starts,
            };
            for i in 0..shape.live_lens[s] {
                let (b, t) = w.slot(s, i, bsi);
                for h in 0..kvh {
                    let k: Vec<T> = (0..hd)
                        .map(|_| T::from_f32(uniform(&mut rng, 1.0)))
                        .collect();
                    let v: Vec<T> = (0..hd)
                        .map(|_| T::from_f32(uniform(&mut rng, 1.0)))
                        .collect();
                    let k0 = PagedKvLayout::offset(&kv.key_strides, b, t, h as i64);
                    let v0 = PagedKvLayout::offset(&kv.value_strides, b, t, h as i64) + voff;
                    key[k0..k0 + hd].copy_from_slice(&k);
                    if shape.kind.is_fused() {
                        key[v0..v0 + hd].copy_from_slice(&v);
                    } else {
                        value[v0..v0 + hd].copy_from_slice(&v);
                    }
                    dense_k[s][h].push(k.iter().map(|x| x.to_f32()).collect());
                    dense_v[s][h].push(v.iter().map(|x| x.to_f32()).collect());
                }
            }
        }
        Self {
            shape,
            kv,
            key,
            value,
            block_tables,
            bt_stride,
            seq_lens,
            live_starts,
            dense_k,
            dense_v,
            rng,
        }
    }

    /// The live windows of the batch.
    pub fn windows(&self) -> LiveWindows<'_> {
        LiveWindows {
            block_tables: &self.block_tables,
            block_table_stride: self.bt_stride,
            seq_lens: &self.seq_lens,
            live_starts: &self.live_starts,
        }
    }

    /// The key view.
    pub fn key_view(&self) -> &[T] {
        &self.key
    }

    /// The value view (an offset into the key tensor for the fused layout).
    pub fn value_view(&self) -> &[T] {
        if self.shape.kind.is_fused() {
            &self.key[self.kv.value_offset()..]
        } else {
            &self.value
        }
    }

    /// Query heads.
    pub fn num_q_heads(&self) -> usize {
        self.shape.kv_heads * self.shape.group
    }

    /// Longest live window.
    pub fn max_live(&self) -> usize {
        self.shape.live_lens.iter().copied().max().unwrap_or(0)
    }

    /// `len` random values in [-scale, scale] rounded to T.
    pub fn random_t(&mut self, len: usize, scale: f32) -> Vec<T> {
        (0..len)
            .map(|_| T::from_f32(uniform(&mut self.rng, scale)))
            .collect()
    }

    /// A stats layout (with padding between blocks) and a buffer of random positive values.
    pub fn random_stats(&mut self) -> (StatsLayout, Vec<f32>) {
        let g = self.shape.group as i64;
        let mut l = StatsLayout::contiguous(
            self.kv.num_blocks,
            self.kv.block_size,
            self.kv.num_kv_heads,
            g,
        );
        l.strides[0] += 5;
        let len = l.strides[0] as usize * l.num_blocks as usize;
        let buf = (0..len).map(|_| self.rng.random::<f32>() * 3.0).collect();
        (l, buf)
    }

    /// A random `window_stats` call of at most `max_queries` queries per sequence: the query counts
    /// (each at most its live length), the arguments (a random statistics window, 0 = every row,
    /// and mode) and the queries `[num_seqs, max_queries, num_q_heads, head_dim]` in [-2, 2].
    pub fn random_window_stats(
        &mut self,
        max_queries: usize,
    ) -> (Vec<i32>, WindowStatsArgs, Vec<T>) {
        let (n, hq, hd) = (self.seq_lens.len(), self.num_q_heads(), self.shape.head_dim);
        let lens = self.shape.live_lens.clone();
        let num_queries: Vec<i32> = lens
            .iter()
            .map(|&l| self.rng.random_range(0..=l.min(max_queries)) as i32)
            .collect();
        let window = self.rng.random_range(0..=max_queries) as i64;
        let mode = if self.rng.random_range(0..2) == 0 {
            StatsMode::Paper
        } else {
            StatsMode::Official
        };
        let args = WindowStatsArgs::contiguous(hq as i64, max_queries as i64, hd as i64)
            .with_stats(window, mode);
        let queries = self.random_t(n * max_queries * hq * hd, 2.0);
        (num_queries, args, queries)
    }

    /// A random compaction: per sequence a whole number of blocks to evict, per (sequence, KV head)
    /// a random set of survivors; returns `num_evict`, the survivors `[num_seqs, kv_heads,
    /// max_live]` (ascending, zero-padded) and each head's survivors as slot lists.
    pub fn random_compaction(&mut self) -> (Vec<i32>, Vec<i32>, Vec<Vec<Vec<usize>>>) {
        let (n, kvh, bs) = (
            self.seq_lens.len(),
            self.shape.kv_heads,
            self.shape.block_size,
        );
        let max_live = self.max_live();
        let lens = self.shape.live_lens.clone();
        let num_evict: Vec<i32> = lens
            .iter()
            .map(|&l| (self.rng.random_range(0..=l / bs) * bs) as i32)
            .collect();
        let mut survivors = vec![0i32; n * kvh * max_live];
        let mut chosen = vec![vec![Vec::new(); kvh]; n];
        for s in 0..n {
            let live = lens[s];
            for kh in 0..kvh {
                let mut idx: Vec<usize> = (0..live).collect();
                for i in (1..idx.len()).rev() {
                    let j = self.rng.random_range(0..=i);
                    idx.swap(i, j);
                }
                let mut keep: Vec<usize> = idx[..live - num_evict[s] as usize].to_vec();
                keep.sort();
                for (k, &i) in keep.iter().enumerate() {
                    survivors[(s * kvh + kh) * max_live + k] = i as i32;
                }
                chosen[s][kh] = keep;
            }
        }
        (num_evict, survivors, chosen)
    }

    /// The CPU `paged_attention_decode` of `query` over the cache through `windows` into `out`.
    pub fn decode(&self, windows: &LiveWindows<'_>, args: &DecodeArgs, query: &[T], out: &mut [T]) {
        paged_attention_decode(
            &self.kv,
            windows,
            args,
            query,
            self.key_view(),
            self.value_view(),
            out,
        )
        .unwrap();
    }

    /// The CPU `window_stats` over the cache, updating `stats` in place.
    pub fn window_stats(
        &self,
        args: &WindowStatsArgs,
        queries: &[T],
        num_queries: &[i32],
        layout: &StatsLayout,
        stats: &mut [f32],
    ) {
        window_stats(
            &self.kv,
            &self.windows(),
            args,
            queries,
            num_queries,
            self.key_view(),
            layout,
            stats,
        )
        .unwrap();
    }

    /// The CPU `compact` of the scenario's own cache (and `stats`, if given); the windows are
    /// unchanged (advancing live_start is the caller's step).
    pub fn compact(
        &mut self,
        max_live: usize,
        num_evict: &[i32],
        survivors: &[i32],
        stats: Option<(&StatsLayout, &mut [f32])>,
    ) {
        let (mut key, mut value) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.value),
        );
        let cache = if self.shape.kind.is_fused() {
            KvCacheMut::Fused(&mut key)
        } else {
            KvCacheMut::Split {
                key: &mut key,
                value: &mut value,
            }
        };
        let done = compact(
            &self.kv,
            &self.windows(),
            max_live as i64,
            num_evict,
            survivors,
            cache,
            stats,
        );
        (self.key, self.value) = (key, value);
        done.unwrap();
    }

    /// The stats row (group * 8 floats) of live slot i of (s, kh).
    pub fn stats_row<'a>(
        &self,
        layout: &StatsLayout,
        buf: &'a [f32],
        s: usize,
        kh: usize,
        i: usize,
    ) -> &'a [f32] {
        let (b, t) = self.windows().slot(s, i, self.kv.block_size);
        let o = layout.offset(b, t, kh as i64);
        &buf[o..o + layout.group_size as usize * NUM_STATS]
    }
}

/// Unit roundoff of T (half an ulp at 1.0).
pub fn eps<T: Element>() -> f32 {
    match T::DTYPE {
        foresightkv::DType::F32 => 6e-8,
        foresightkv::DType::F16 => 4.9e-4,
        foresightkv::DType::Bf16 => 3.9e-3,
    }
}

/// Asserts |a - b| <= atol + rtol |b| elementwise.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs() || (g.is_nan() && w.is_nan()) || g == w;
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})"
        );
    }
}

/// Asserts two f32 buffers are equal bit for bit.
pub fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert!(
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}"
    );
}

/// A random `select_survivors` case over a scenario's windows: scores per (sequence, KV head, live
/// slot) with one spare column, and per sequence `frac` of its unprotected entries to evict.
pub struct SelectCase {
    pub args: SelectArgs,
    pub scores: Vec<f32>,
    pub num_evict: Vec<i32>,
}

impl SelectCase {
    /// Scores in [-3, 3] (or, with `ties`, drawn from 4 values so that ties are common).
    pub fn new<T: Element>(sc: &mut Scenario<T>, protected: usize, frac: f64, ties: bool) -> Self {
        let (n, kvh) = (sc.seq_lens.len(), sc.shape.kv_heads);
        let max_live = sc.max_live() + 1;
        let scores = (0..n * kvh * max_live)
            .map(|_| {
                if ties {
                    sc.rng.random_range(0..4) as f32
                } else {
                    uniform(&mut sc.rng, 3.0)
                }
            })
            .collect();
        let num_evict = sc
            .shape
            .live_lens
            .iter()
            .map(|&l| (l.saturating_sub(protected) as f64 * frac) as i32)
            .collect();
        let args = SelectArgs {
            num_kv_heads: kvh as i64,
            max_live: max_live as i64,
            num_protected: protected as i64,
        };
        SelectCase {
            args,
            scores,
            num_evict,
        }
    }

    /// The CPU reference's survivors (unused entries hold `fill`).
    pub fn reference<T: Element>(&self, sc: &Scenario<T>, fill: i32) -> Vec<i32> {
        let mut out = vec![fill; self.scores.len()];
        select_survivors(
            &sc.seq_lens,
            &sc.live_starts,
            &self.args,
            &self.scores,
            &self.num_evict,
            &mut out,
        )
        .unwrap();
        out
    }
}

/// A random `scorer_mlp` case over a scenario: statistics (as [`Scenario::random_stats`]) and
/// per-KV-head weights for its `in_dim = 2 head_dim + 8 G` input features.
pub struct ScorerCase {
    pub in_dim: usize,
    pub layout: StatsLayout,
    pub stats: Vec<f32>,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
}

impl ScorerCase {
    /// w1 in [-s, s] with `s = w1_scale(in_dim)`, the biases and w2 in [-0.5, 0.5].
    pub fn new<T: Element>(sc: &mut Scenario<T>, w1_scale: impl Fn(usize) -> f32) -> Self {
        let (kvh, hd, g) = (sc.shape.kv_heads, sc.shape.head_dim, sc.shape.group);
        let in_dim = 2 * hd + NUM_STATS * g;
        let (layout, stats) = sc.random_stats();
        let mut r = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| uniform(&mut sc.rng, scale)).collect()
        };
        let w1 = r(kvh * SCORER_HIDDEN * in_dim, w1_scale(in_dim));
        let b1 = r(kvh * SCORER_HIDDEN, 0.5);
        let w2 = r(kvh * SCORER_HIDDEN, 0.5);
        let b2 = r(kvh, 0.5);
        ScorerCase {
            in_dim,
            layout,
            stats,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The weights as the kernels take them.
    pub fn weights(&self) -> ScorerWeights<'_> {
        ScorerWeights {
            w1: &self.w1,
            b1: &self.b1,
            w2: &self.w2,
            b2: &self.b2,
        }
    }

    /// The CPU reference's scores `[num_seqs, kv_heads, max_live]` (unused slots hold `fill`).
    pub fn reference<T: Element>(&self, sc: &Scenario<T>, max_live: usize, fill: f32) -> Vec<f32> {
        let mut out = vec![fill; sc.seq_lens.len() * sc.shape.kv_heads * max_live];
        scorer_mlp(
            &sc.kv,
            &sc.windows(),
            sc.key_view(),
            sc.value_view(),
            &self.layout,
            &self.stats,
            &self.weights(),
            max_live as i64,
            &mut out,
        )
        .unwrap();
        out
    }
}
