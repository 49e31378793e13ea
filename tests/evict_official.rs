//! A converted official-layout checkpoint, scored on random inputs in the `official` statistics
//! mode, against the official training code's features and forward written here from their
//! definition (RUCAIBox/ForesightKV `supervised_training/cache.py`, `KVCluster.init_kv` /
//! `update_kv`, and `qwen3.py`, `SelectionModel`), over two evictions so the per-interval decay and
//! the carried cumulative statistics are exercised.
#![allow(clippy::needless_range_loop)]

mod common;

use foresightkv::evict::convert::{convert_official, OfficialTensors};
use foresightkv::evict::tensors::{serialize, OwnedTensor};
use foresightkv::evict::{
    normals, EvictionPolicy, EvictionView, ForesightPolicy, ModelShape, SampleKey, StatsMode,
    VictimMode,
};
use foresightkv::kernels::{DenseRows, WindowStatsArgs, NUM_STATS};
use rand::SeedableRng;
use std::sync::Arc;

const KV: usize = 2;
const G: usize = 3;
const D: usize = 8;
const B: usize = 48;
const L: usize = 40; // > 32: the paper's sum8/16/32 all differ from the official ones
const T: usize = B + 2 * L;
const H: usize = 16;

/// The official judge model's tensors: fc1 `[kv, in, 16]`, fc2 `[kv, 16, 1]`, biases.
struct Official {
    fc1: Vec<f32>,
    b1: Vec<f32>,
    fc2: Vec<f32>,
    b2: Vec<f32>,
}

impl Official {
    /// `fc2(GELU(fc1(x)))` of KV head `kh` (HeadWiseLinear: `einsum('...hi,hio->...ho')`).
    fn forward(&self, kh: usize, x: &[f64]) -> f64 {
        let i = x.len();
        let mut out = self.b2[kh] as f64;
        for u in 0..H {
            let mut h = self.b1[kh * H + u] as f64;
            for (c, xc) in x.iter().enumerate() {
                h += xc * self.fc1[(kh * i + c) * H + u] as f64;
            }
            let gelu = 0.5 * h * (1.0 + common::erf(h / std::f64::consts::SQRT_2));
            out += gelu * self.fc2[kh * H + u] as f64;
        }
        out
    }
}

/// `softmax(q k^T / sqrt(d) + causal mask)` of query head `h` at position `j` over `keys` (the
/// first `visible` of them).
fn probs(q: &[f32], keys: &[Vec<f32>], visible: usize) -> Vec<f64> {
    let scale = 1.0 / (D as f64).sqrt();
    let logits: Vec<f64> = keys[..visible]
        .iter()
        .map(|k| common::dot64(q, k) * scale)
        .collect();
    let mut p = common::softmax(&logits);
    p.resize(keys.len(), 0.0);
    p
}

#[test]
fn converted_official_checkpoint_scores_the_official_features() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let in_dim = 2 * D + 8 * G;
    let off = Official {
        fc1: normals(&mut rng, KV * in_dim * H, 0.4),
        b1: normals(&mut rng, KV * H, 0.2),
        fc2: normals(&mut rng, KV * H, 0.4),
        b2: normals(&mut rng, KV, 0.2),
    };
    let p = "model.layers.0.self_attn.judge_model.";
    let tensors = vec![
        (
            format!("{p}fc1.weight"),
            OwnedTensor::f32(vec![KV, in_dim, H], &off.fc1),
        ),
        (
            format!("{p}fc1.bias"),
            OwnedTensor::f32(vec![KV, H], &off.b1),
        ),
        (
            format!("{p}fc2.weight"),
            OwnedTensor::f32(vec![KV, H, 1], &off.fc2),
        ),
        (
            format!("{p}fc2.bias"),
            OwnedTensor::f32(vec![KV, 1], &off.b2),
        ),
        (
            format!("{p}feature_norm.weight"),
            OwnedTensor::f32(vec![in_dim], &vec![1.0; in_dim]),
        ),
        (
            format!("{p}feature_norm.bias"),
            OwnedTensor::f32(vec![in_dim], &vec![0.0; in_dim]),
        ),
    ];
    let mut gathered = OfficialTensors::default();
    gathered
        .add_shard("official", &serialize(&tensors, "official").unwrap())
        .unwrap();
    let shape = ModelShape {
        num_layers: 1,
        num_kv_heads: KV,
        group_size: G,
        head_dim: D,
    };
    let ck = Arc::new(convert_official(&gathered, shape, B, L).unwrap());
    assert_eq!(ck.config.stats_mode, StatsMode::Official);
    let policy = ForesightPolicy::new(ck, VictimMode::TopL);

    // Random RoPE'd queries [T, KV * G, D], keys and values [T, KV, D].
    let q = normals(&mut rng, T * KV * G * D, 2.0);
    let k = normals(&mut rng, T * KV * D, 1.0);
    let v = normals(&mut rng, T * KV * D, 1.0);
    let qrow = |t: usize, h: usize| &q[(t * KV * G + h) * D..][..D];
    let krow = |t: usize, kh: usize| k[(t * KV + kh) * D..][..D].to_vec();
    let vrow = |t: usize, kh: usize| v[(t * KV + kh) * D..][..D].to_vec();

    let mut compared = 0;
    for kh in 0..KV {
        // --- The official code: init_kv over the first B queries. ---
        let mut pos: Vec<usize> = (0..B).collect();
        let mut cum = vec![[0f64; G]; B];
        for g in 0..G {
            let keys: Vec<Vec<f32>> = pos.iter().map(|&t| krow(t, kh)).collect();
            for j in 0..B {
                let pr = probs(qrow(j, kh * G + g), &keys, j + 1);
                for i in 0..B {
                    cum[i][g] += pr[i];
                }
            }
        }
        let mut dec = cum.clone();
        // --- Ours: the live cache of this KV head, statistics zero, every query since token 0. ---
        let mut live_pos: Vec<usize> = Vec::new();
        let mut stats: Vec<f32> = Vec::new();
        let mut since = 0;
        for chunk in 0..2 {
            let c0 = B + chunk * L;
            // Official update_kv over the chunk [c0, c0 + L), cache = B kept + L new.
            pos.extend(c0..c0 + L);
            let n = B + L;
            let keys: Vec<Vec<f32>> = pos.iter().map(|&t| krow(t, kh)).collect();
            let (mut mx, mut mn, mut sum) =
                (vec![[0f64; G]; n], vec![[0f64; G]; n], vec![[0f64; G]; n]);
            for g in 0..G {
                let rows: Vec<Vec<f64>> = (0..L)
                    .map(|t| probs(qrow(c0 + t, kh * G + g), &keys, B + t + 1))
                    .collect();
                for i in 0..n {
                    let col: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                    mx[i][g] = col.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    mn[i][g] = col.iter().copied().fold(f64::INFINITY, f64::min);
                    sum[i][g] = col.iter().sum();
                }
            }
            // attn_weights[:, :, -8:] (and -16, -32) slices the group axis: with G <= 8 every head
            // of the group, each summed over all the chunk's queries.
            let sliced = |w: usize, i: usize| -> Vec<f64> {
                (G.saturating_sub(w)..G).map(|g| sum[i][g]).collect()
            };
            for i in 0..B {
                for g in 0..G {
                    cum[i][g] += sum[i][g];
                    dec[i][g] = dec[i][g] * 0.9 + sum[i][g];
                }
            }
            let official_scores: Vec<f64> = (0..B)
                .map(|i| {
                    let mut x: Vec<f64> = krow(pos[i], kh).iter().map(|&a| a as f64).collect();
                    x.extend(vrow(pos[i], kh).iter().map(|&a| a as f64));
                    x.extend(mx[i]);
                    x.extend(mn[i]);
                    x.extend(sum[i]);
                    x.extend(sliced(16, i));
                    x.extend(sliced(8, i));
                    x.extend(sliced(32, i));
                    x.extend(cum[i]);
                    x.extend(dec[i]);
                    assert_eq!(x.len(), in_dim);
                    off.forward(kh, &x)
                })
                .collect();

            // Ours: tokens up to c0 + L arrive, window_stats over the queries since the last
            // eviction (window L, official mode), then the converted scorer.
            live_pos.extend(live_pos.len().max(since)..c0 + L);
            let live = live_pos.len();
            stats.resize(live * G * NUM_STATS, 0.0);
            let m = c0 + L - since;
            let queries: Vec<f32> = (since..c0 + L)
                .flat_map(|j| (0..G).flat_map(move |g| qrow(j, kh * G + g).to_vec()))
                .collect();
            let kbuf: Vec<f32> = live_pos.iter().flat_map(|&t| krow(t, kh)).collect();
            let vbuf: Vec<f32> = live_pos.iter().flat_map(|&t| vrow(t, kh)).collect();
            let rows = DenseRows::new(live, D, G);
            let args = WindowStatsArgs::contiguous(G as i64, m as i64, D as i64)
                .with_stats(L as i64, StatsMode::Official);
            rows.window_stats(&args, &queries, m as i32, &kbuf, &mut stats)
                .unwrap();
            let positions: Vec<u32> = live_pos.iter().map(|&t| t as u32).collect();
            let view = EvictionView {
                key: SampleKey {
                    layer: 0,
                    head: kh as u32,
                    eviction: chunk as u32,
                    ..SampleKey::default()
                },
                head_dim: D,
                group_size: G,
                scale: 1.0 / (D as f32).sqrt(),
                seq_len: c0 + L,
                keys: &kbuf,
                values: &vbuf,
                stats: &stats,
                queries: &queries,
                positions: &positions,
            };
            let mut ours = vec![0f32; live];
            policy.score(&view, &mut ours).unwrap();
            assert_eq!(
                positions[..B]
                    .iter()
                    .map(|&p| p as usize)
                    .collect::<Vec<_>>(),
                pos[..B]
            );
            for i in 0..B {
                let (got, want) = (ours[i] as f64, official_scores[i]);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "KV head {kh}, eviction {chunk}, slot {i}: ours {got} official {want}"
                );
                compared += 1;
            }

            // Both drop the L highest official scores among the first B (topk=True), keep the
            // rest in order; the new L entries carry the chunk sum as cumulative and decayed.
            let mut order: Vec<usize> = (0..B).collect();
            order.sort_by(|&a, &b| official_scores[b].total_cmp(&official_scores[a]));
            let mut drop = order[..L].to_vec();
            drop.sort_unstable();
            let keep: Vec<usize> = (0..n).filter(|i| !drop.contains(i)).collect();
            pos = keep.iter().map(|&i| pos[i]).collect();
            let new_from = cum.len();
            let carried = |old: &[[f64; G]]| -> Vec<[f64; G]> {
                keep.iter()
                    .filter(|&&i| i < new_from)
                    .map(|&i| old[i])
                    .chain((B..n).map(|i| sum[i]))
                    .collect()
            };
            cum = carried(&cum);
            dec = carried(&dec);
            let row = G * NUM_STATS;
            let mut kept_stats = Vec::with_capacity(B * row);
            for &i in &keep {
                kept_stats.extend_from_slice(&stats[i * row..(i + 1) * row]);
            }
            stats = kept_stats;
            live_pos = keep.iter().map(|&i| live_pos[i]).collect();
            since = c0 + L;
        }
    }
    assert_eq!(compared, KV * 2 * B);
}
