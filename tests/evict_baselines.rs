//! Each baseline policy on a hand-built eviction step whose correct victims are known.

use foresightkv::evict::baselines::max_pool;
use foresightkv::evict::{
    choose_victims, EvictionPolicy, EvictionView, FullCache, H2o, RandomEviction, Rkv, SampleKey,
    SnapKv, StreamingLlm, Tova,
};
use foresightkv::kernels::window_stats::STAT_CUMULATIVE;
use foresightkv::kernels::NUM_STATS;
use proptest::prelude::*;

/// Owned buffers behind an [`EvictionView`] with `n` live entries, head_dim `d`, group `g`, `m` queries.
struct Case {
    d: usize,
    g: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
    stats: Vec<f32>,
    queries: Vec<f32>,
    positions: Vec<u32>,
}

impl Case {
    fn new(n: usize, d: usize, g: usize, m: usize) -> Self {
        Self {
            d,
            g,
            keys: vec![0.0; n * d],
            values: vec![0.0; n * d],
            stats: vec![0.0; n * g * NUM_STATS],
            queries: vec![0.0; m * g * d],
            positions: (0..n as u32).collect(),
        }
    }

    /// Sets statistic `stat` of slot `i` to `v` for every query head of the group.
    fn set_stat(&mut self, i: usize, stat: usize, v: f32) {
        for gi in 0..self.g {
            self.stats[(i * self.g + gi) * NUM_STATS + stat] = v;
        }
    }

    fn view(&self) -> EvictionView<'_> {
        EvictionView {
            key: SampleKey {
                seed: 0,
                request: 1,
                layer: 0,
                head: 0,
                eviction: 0,
            },
            head_dim: self.d,
            group_size: self.g,
            scale: 1.0,
            seq_len: *self.positions.last().unwrap_or(&0) as usize + 1,
            keys: &self.keys,
            values: &self.values,
            stats: &self.stats,
            queries: &self.queries,
            positions: &self.positions,
        }
    }
}

#[test]
fn full_cache_never_evicts() {
    let c = Case::new(8, 4, 1, 1);
    assert!(choose_victims(&FullCache, &c.view(), 2, 3)
        .unwrap()
        .is_empty());
}

#[test]
fn streaming_keeps_sinks_and_drops_oldest() {
    let mut c = Case::new(12, 4, 1, 1);
    // After earlier evictions the live window holds these original positions.
    c.positions = vec![0, 1, 2, 3, 40, 41, 57, 60, 61, 62, 63, 64];
    let v = choose_victims(&StreamingLlm::default(), &c.view(), 4, 3).unwrap();
    assert_eq!(v, vec![4, 5, 6], "the three oldest non-sink entries");
}

#[test]
fn h2o_drops_lowest_cumulative_attention() {
    let mut c = Case::new(10, 4, 2, 1);
    let cum = [5.0, 0.1, 3.0, 0.2, 4.0, 0.05, 2.0, 9.0, 0.0, 0.0];
    for (i, &x) in cum.iter().enumerate() {
        c.set_stat(i, STAT_CUMULATIVE, x);
    }
    let v = choose_victims(&H2o, &c.view(), 2, 3).unwrap();
    assert_eq!(v, vec![1, 3, 5]);
}

#[test]
fn snapkv_pooling_protects_neighbours_of_a_peak() {
    let n = 12;
    let mut c = Case::new(n, n, 1, 1);
    for i in 0..n {
        c.keys[i * n + i] = 1.0; // one-hot keys
    }
    c.queries[5] = 6.0; // the last query looks at slot 5
                        // Pooled (kernel 7) attention peaks on slots 2..=8 and is flat elsewhere: victims 0, 1, 9.
    let v = choose_victims(&SnapKv::default(), &c.view(), 2, 3).unwrap();
    assert_eq!(v, vec![0, 1, 9]);
}

#[test]
fn tova_drops_what_the_last_query_ignores() {
    let (n, g, m) = (8, 2, 2);
    let mut c = Case::new(n, n, g, m);
    for i in 0..n {
        c.keys[i * n + i] = 1.0; // one-hot keys
    }
    // Last query row: both heads look at slots 1, 4 and 5; the earlier row looks elsewhere.
    for gi in 0..g {
        let last = ((m - 1) * g + gi) * n;
        for (slot, w) in [(1, 6.0), (4, 5.0), (5, 7.0)] {
            c.queries[last + slot] = w;
        }
        c.queries[gi * n] = 9.0;
        c.queries[gi * n + 2] = 9.0;
    }
    let v = choose_victims(&Tova, &c.view(), 2, 3).unwrap();
    assert_eq!(v, vec![0, 2, 3]);
}

#[test]
fn rkv_drops_redundant_keys_when_importance_is_flat() {
    let (n, d) = (10, 16);
    let mut c = Case::new(n, d, 1, 1);
    for i in 0..n {
        let axis = if [1, 4, 6].contains(&i) { 0 } else { i + 1 };
        c.keys[i * d + axis] = 1.0;
    }
    // Zero queries: flat importance. Keys 1, 4 and 6 are identical; R-KV spares the most recent of
    // each similar pair (6), so 1 (similar to 4 and 6) and 4 (similar to 1) are the redundant ones.
    let v = choose_victims(&Rkv::default(), &c.view(), 2, 2).unwrap();
    assert_eq!(v, vec![1, 4], "the identical keys but the most recent");
}

/// Seeded normal samples.
fn normals(n: usize, seed: u64) -> Vec<f32> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// The R-KV code's observation importance (`rkv/utils.py` + `r1_kv.py`), in f64 from its
/// definition: logits max-reduced over the group, softmax over the keys before the last 8, mean
/// over the last 8 queries, max_pool1d(7, padding 3).
fn rkv_code_importance(c: &Case, n: usize, m: usize, scale: f64) -> Vec<f64> {
    let (d, g, w) = (c.d, c.g, 8usize.min(m));
    let keys = n - w;
    let mut mean = vec![0f64; keys];
    for j in m - w..m {
        let logits: Vec<f64> = (0..keys)
            .map(|i| {
                (0..g)
                    .map(|gi| {
                        let q = &c.queries[(j * g + gi) * d..][..d];
                        let k = &c.keys[i * d..][..d];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        for (o, l) in mean.iter_mut().zip(&logits) {
            *o += (l - mx).exp() / z / w as f64;
        }
    }
    (0..keys)
        .map(|i| {
            mean[i.saturating_sub(3)..(i + 4).min(keys)]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// `rkv/utils.py::cal_similarity` (threshold 0.5, retain "last"), in f64.
fn rkv_code_redundancy(c: &Case, n: usize) -> Vec<f64> {
    let d = c.d;
    let unit: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let k: Vec<f64> = c.keys[i * d..][..d].iter().map(|x| *x as f64).collect();
            let norm = k.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-8;
            k.iter().map(|x| x / norm).collect()
        })
        .collect();
    let mut sim: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if i == j {
                        0.0
                    } else {
                        unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum()
                    }
                })
                .collect()
        })
        .collect();
    for row in sim.iter_mut() {
        let idx: Vec<usize> = (0..n).map(|j| if row[j] > 0.5 { j } else { 0 }).collect();
        let retain = *idx.iter().max().unwrap();
        row[retain] = 0.0;
    }
    let mean: Vec<f64> = (0..n)
        .map(|j| (0..n).map(|i| sim[i][j]).sum::<f64>() / n as f64)
        .collect();
    let mx = mean.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = mean.iter().map(|x| (x - mx).exp()).sum();
    mean.iter().map(|x| (x - mx).exp() / z).collect()
}

/// SnapKV and R-KV with non-flat importance on random GQA inputs equal the R-KV code's formulas
/// (window 8, max over the group's logits, mean over the window's queries, R-KV's redundancy), so
/// lambda weighs a mean attention (at most 1), not a sum over 8 queries x G heads.
#[test]
fn snapkv_and_rkv_match_the_rkv_code_definition() {
    let (n, d, g, m) = (40, 16, 4, 12);
    let mut c = Case::new(n, d, g, m);
    c.keys = normals(n * d, 1);
    // Some keys close to each other, so the similarity threshold matters.
    for i in [7usize, 19, 33] {
        for x in 0..d {
            c.keys[i * d + x] = c.keys[3 * d + x] + 0.1 * c.keys[i * d + x];
        }
    }
    c.queries = normals(m * g * d, 2).iter().map(|x| 2.0 * x).collect();
    let scale = 1.0 / (d as f64).sqrt();
    let mut view = c.view();
    view.scale = scale as f32;
    let imp = rkv_code_importance(&c, n, m, scale);
    let spread =
        imp.iter().copied().fold(0f64, f64::max) / imp.iter().copied().fold(1f64, f64::min);
    assert!(
        spread > 3.0,
        "importance must not be flat: max/min {spread}"
    );
    let red = rkv_code_redundancy(&c, n);
    let mut snap = vec![0f32; n];
    SnapKv::default().score(&view, &mut snap).unwrap();
    let mut rkv = vec![0f32; n];
    Rkv::default().score(&view, &mut rkv).unwrap();
    for i in 0..n {
        if i >= n - 8 {
            assert_eq!(snap[i], f32::NEG_INFINITY, "window entry {i} is kept");
            assert_eq!(rkv[i], f32::NEG_INFINITY, "window entry {i} is kept");
            continue;
        }
        let want_snap = -imp[i];
        let want_rkv = -(0.1 * imp[i] - 0.9 * red[i]);
        assert!(
            (snap[i] as f64 - want_snap).abs() < 1e-6,
            "snapkv slot {i}: {} vs {want_snap}",
            snap[i]
        );
        assert!(
            (rkv[i] as f64 - want_rkv).abs() < 1e-6,
            "rkv slot {i}: {} vs {want_rkv}",
            rkv[i]
        );
    }
}

#[test]
fn random_is_reproducible_and_seeded() {
    let c = Case::new(64, 4, 1, 1);
    let a = choose_victims(&RandomEviction { seed: 1 }, &c.view(), 8, 16).unwrap();
    let b = choose_victims(&RandomEviction { seed: 1 }, &c.view(), 8, 16).unwrap();
    let other = choose_victims(&RandomEviction { seed: 2 }, &c.view(), 8, 16).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, other);
    assert_eq!(a.len(), 16);
    assert!(a.iter().all(|&i| i < 56));
}

#[test]
fn tova_without_queries_is_a_typed_error() {
    let c = Case::new(8, 4, 1, 0);
    let mut s = vec![0.0; 8];
    assert!(Tova.score(&c.view(), &mut s).is_err());
}

#[test]
fn view_shape_errors_are_typed() {
    let mut c = Case::new(8, 4, 1, 1);
    c.values.pop();
    assert!(choose_victims(&H2o, &c.view(), 2, 2).is_err());
}

proptest! {
    #[test]
    fn max_pool_dominates_and_is_local(x in proptest::collection::vec(-5f32..5.0, 1..60), half in 0usize..4) {
        let k = 2 * half + 1;
        let p = max_pool(&x, k);
        prop_assert_eq!(p.len(), x.len());
        for i in 0..x.len() {
            prop_assert!(p[i] >= x[i]);
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            prop_assert!(x[lo..hi].contains(&p[i]));
        }
    }

    #[test]
    fn streaming_never_evicts_sinks_when_others_remain(n in 12usize..80, evict_frac in 0.0f64..1.0) {
        let c = Case::new(n, 2, 1, 1);
        let prot = 4;
        let e = ((n - prot - 4) as f64 * evict_frac) as usize;
        let v = choose_victims(&StreamingLlm::default(), &c.view(), prot, e).unwrap();
        prop_assert!(v.iter().all(|&i| i >= 4));
        prop_assert_eq!(v, (4..4 + e).collect::<Vec<_>>());
    }
}
