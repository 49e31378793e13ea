//! The CPU references of the eviction kernels against naive dense computations on random paged
//! caches (shapes, dtypes, GQA ratios, ragged lengths, live_start > 0, block sizes 1 and 16).
#![allow(clippy::needless_range_loop)]

mod common;
mod kernels_support;

use foresightkv::kernels::window_stats::{
    DECAY, STAT_CUMULATIVE, STAT_DECAYED, STAT_MAX, STAT_MIN, STAT_SUM, STAT_SUM16, STAT_SUM32,
    STAT_SUM8,
};
use foresightkv::kernels::{
    select_survivors, window_stats, DecodeArgs, DenseRows, SelectArgs, StatsMode, WindowStatsArgs,
    NUM_STATS, SCORER_HIDDEN,
};
use foresightkv::Element;
use half::{bf16, f16};
use kernels_support::{
    assert_close, assert_same_bits, eps, shapes, uniform, Scenario, ScorerCase, SelectCase, Shape,
};
use proptest::prelude::*;
use rand::RngExt;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dense softmax attention of one query over rows, in f64.
fn naive_attend(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let hd = q.len();
    if keys.is_empty() {
        return vec![0.0; hd];
    }
    let logits: Vec<f64> = keys
        .iter()
        .map(|k| dot(q, k) as f64 * scale as f64)
        .collect();
    let p = common::softmax(&logits);
    (0..hd)
        .map(|d| {
            p.iter()
                .zip(values)
                .map(|(p, v)| p * v[d] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn check_decode<T: Element>(shape: Shape) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, hq, hd, g) = (
        sc.seq_lens.len(),
        sc.num_q_heads(),
        sc.shape.head_dim,
        sc.shape.group,
    );
    // Padded query rows exercise the strides.
    let mut args = DecodeArgs::contiguous(hq as i64, hd as i64);
    args.query_strides = [(hq * hd + 3 * hd) as i64, hd as i64];
    let query = sc.random_t(n * (hq * hd + 3 * hd), 2.0);
    let mut out = vec![T::from_f32(f32::NAN); n * hq * hd];
    sc.decode(&sc.windows(), &args, &query, &mut out);
    for s in 0..n {
        for h in 0..hq {
            let q0 = s * args.query_strides[0] as usize + h * hd;
            let q: Vec<f32> = query[q0..q0 + hd].iter().map(|x| x.to_f32()).collect();
            let want = naive_attend(&q, &sc.dense_k[s][h / g], &sc.dense_v[s][h / g], args.scale);
            let got: Vec<f32> = out[(s * hq + h) * hd..][..hd]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            assert_close(
                &format!("decode s{s} h{h}"),
                &got,
                &want,
                1e-5 + 2.0 * eps::<T>(),
                2.0 * eps::<T>() + 1e-5,
            );
        }
    }
}

/// Naive stats of one (s, query head) from the definition: the full masked probability matrix,
/// rows before the last `w` folded, then closed forms (`official`: sum8/16/32 = the window sum).
fn naive_stats(
    probs: &[Vec<f64>],
    base: usize,
    old: Option<(f32, f32)>,
    i: usize,
    w: usize,
    official: bool,
) -> [f64; 8] {
    let n = probs.len();
    let first = n - w;
    let win: Vec<(usize, f64)> = (first..n).map(|j| (j, probs[j][i])).collect();
    let folded: f64 = (0..first).map(|j| probs[j][i]).sum();
    let seen: Vec<f64> = win
        .iter()
        .filter(|(j, _)| base + j >= i)
        .map(|c| c.1)
        .collect();
    let total: f64 = win.iter().map(|c| c.1).sum();
    let sum_last = |k: usize| {
        if official {
            return total;
        }
        win.iter()
            .filter(|(j, _)| *j + k >= n)
            .map(|c| c.1)
            .sum::<f64>()
    };
    let (oc, od) = old.map(|(c, d)| (c as f64, d as f64)).unwrap_or((0.0, 0.0));
    [
        seen.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        seen.iter().copied().fold(f64::INFINITY, f64::min),
        total,
        sum_last(8),
        sum_last(16),
        sum_last(32),
        oc + folded + total,
        DECAY as f64 * (od + folded) + total,
    ]
}

fn check_window_stats<T: Element>(shape: Shape, max_queries: usize) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, hq, hd, g, kvh) = (
        sc.seq_lens.len(),
        sc.num_q_heads(),
        sc.shape.head_dim,
        sc.shape.group,
        sc.shape.kv_heads,
    );
    let (num_queries, args, queries) = sc.random_window_stats(max_queries);
    let (window, mode) = (args.window as usize, args.mode);
    let (layout, mut stats) = sc.random_stats();
    let before = stats.clone();
    sc.window_stats(&args, &queries, &num_queries, &layout, &mut stats);
    for s in 0..n {
        let nq = num_queries[s] as usize;
        let live = sc.shape.live_lens[s];
        for kh in 0..kvh {
            for gi in 0..g {
                let h = kh * g + gi;
                let probs: Vec<Vec<f64>> = (0..nq)
                    .map(|j| {
                        let q0 = ((s * max_queries + j) * hq + h) * hd;
                        let q: Vec<f32> = queries[q0..q0 + hd].iter().map(|x| x.to_f32()).collect();
                        let visible = live - nq + j + 1;
                        let logits: Vec<f64> = (0..live)
                            .map(|i| {
                                if i < visible {
                                    dot(&q, &sc.dense_k[s][kh][i]) as f64 * args.scale as f64
                                } else {
                                    f64::NEG_INFINITY
                                }
                            })
                            .collect();
                        common::softmax(&logits)
                    })
                    .collect();
                for i in 0..live {
                    let got =
                        &sc.stats_row(&layout, &stats, s, kh, i)[gi * NUM_STATS..][..NUM_STATS];
                    let old_row =
                        &sc.stats_row(&layout, &before, s, kh, i)[gi * NUM_STATS..][..NUM_STATS];
                    if nq == 0 {
                        assert_eq!(got, old_row, "untouched when no queries");
                        continue;
                    }
                    let base = live - nq;
                    let old = (i < base).then(|| (old_row[STAT_CUMULATIVE], old_row[STAT_DECAYED]));
                    let w = if window == 0 { nq } else { nq.min(window) };
                    let official = mode == StatsMode::Official;
                    let want: Vec<f32> = naive_stats(&probs, base, old, i, w, official)
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    assert_close(
                        &format!("stats s{s} kh{kh} g{gi} slot{i}"),
                        got,
                        &want,
                        2e-5,
                        1e-4,
                    );
                }
            }
        }
    }
    // Nothing outside the live windows' rows changed.
    let mut touched = vec![false; stats.len()];
    for s in 0..n {
        for kh in 0..kvh {
            for i in 0..sc.shape.live_lens[s] {
                let (b, t) = sc.windows().slot(s, i, sc.kv.block_size);
                let o = layout.offset(b, t, kh as i64);
                touched[o..o + g * NUM_STATS]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
        }
    }
    for (k, &t) in touched.iter().enumerate() {
        if !t {
            assert_eq!(
                stats[k].to_bits(),
                before[k].to_bits(),
                "stats[{k}] outside the live rows changed"
            );
        }
    }
}

fn check_scorer<T: Element>(shape: Shape) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, kvh) = (sc.seq_lens.len(), sc.shape.kv_heads);
    let case = ScorerCase::new(&mut sc, |in_dim| 1.0 / (in_dim as f32).sqrt() * 2.0);
    let (in_dim, layout, stats) = (case.in_dim, &case.layout, &case.stats);
    let (w1, b1, w2, b2) = (&case.w1, &case.b1, &case.w2, &case.b2);
    let max_live = sc.max_live() + 2;
    let scores = case.reference(&sc, max_live, f32::NAN);
    for s in 0..n {
        for kh in 0..kvh {
            for i in 0..max_live {
                let got = scores[(s * kvh + kh) * max_live + i];
                if i >= sc.shape.live_lens[s] {
                    assert!(got.is_nan(), "slot past the live window written");
                    continue;
                }
                let mut x: Vec<f64> = sc.dense_k[s][kh][i].iter().map(|&v| v as f64).collect();
                x.extend(sc.dense_v[s][kh][i].iter().map(|&v| v as f64));
                x.extend(
                    sc.stats_row(layout, stats, s, kh, i)
                        .iter()
                        .map(|&v| v as f64),
                );
                let mut want = b2[kh] as f64;
                for u in 0..SCORER_HIDDEN {
                    let w = &w1[(kh * SCORER_HIDDEN + u) * in_dim..][..in_dim];
                    let pre: f64 = b1[kh * SCORER_HIDDEN + u] as f64
                        + w.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum::<f64>();
                    let gelu = 0.5 * pre * (1.0 + common::erf(pre / std::f64::consts::SQRT_2));
                    want += w2[kh * SCORER_HIDDEN + u] as f64 * gelu;
                }
                assert_close(
                    &format!("score s{s} kh{kh} slot{i}"),
                    &[got],
                    &[want as f32],
                    1e-4,
                    1e-4,
                );
            }
        }
    }
}

/// Evicts by repeated arg-max (ties: the lowest index), returns sorted survivors.
fn naive_select(scores: &[f32], live: usize, protected: usize, evict: usize) -> Vec<i32> {
    let mut gone = vec![false; live];
    for _ in 0..evict {
        let mut best: Option<usize> = None;
        for i in 0..live.saturating_sub(protected) {
            if gone[i] {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => scores[i] > scores[b] || (scores[i].is_nan() && !scores[b].is_nan()),
            };
            if better {
                best = Some(i);
            }
        }
        gone[best.expect("a candidate left")] = true;
    }
    (0..live).filter(|&i| !gone[i]).map(|i| i as i32).collect()
}

fn check_select(shape: Shape, protected: usize, frac: f64, ties: bool) {
    let mut sc = Scenario::<f32>::new(shape);
    let (n, kvh) = (sc.seq_lens.len(), sc.shape.kv_heads);
    let case = SelectCase::new(&mut sc, protected, frac, ties);
    let (scores, num_evict) = (&case.scores, &case.num_evict);
    let max_live = case.args.max_live as usize;
    let survivors = case.reference(&sc, -7);
    for s in 0..n {
        let live = sc.shape.live_lens[s];
        for kh in 0..kvh {
            let row = (s * kvh + kh) * max_live;
            let want = naive_select(
                &scores[row..row + live],
                live,
                protected,
                num_evict[s] as usize,
            );
            assert_eq!(&survivors[row..row + want.len()], &want[..], "s{s} kh{kh}");
            assert!(
                survivors[row + want.len()..row + max_live]
                    .iter()
                    .all(|&x| x == -7),
                "wrote past the survivors"
            );
        }
    }
}

fn check_compact<T: Element>(shape: Shape, with_stats: bool) {
    let mut sc = Scenario::<T>::new(shape);
    let (n, kvh, hd) = (sc.seq_lens.len(), sc.shape.kv_heads, sc.shape.head_dim);
    let max_live = sc.max_live();
    let (num_evict, survivors, chosen) = sc.random_compaction();
    let (layout, mut stats) = sc.random_stats();
    let stats_before = stats.clone();
    let (key_before, value_before) = (sc.key.clone(), sc.value.clone());
    let st = if with_stats {
        Some((&layout, &mut stats[..]))
    } else {
        None
    };
    sc.compact(max_live, &num_evict, &survivors, st);
    let (windows, kv, fused) = (sc.windows(), sc.kv, sc.shape.kind.is_fused());
    // Expected buffers: the originals with each destination row replaced by its survivor's row.
    let (mut ek, mut ev, mut es) = (
        key_before.clone(),
        value_before.clone(),
        stats_before.clone(),
    );
    let voff = if fused { kv.value_offset() } else { 0 };
    let row = layout.group_size as usize * NUM_STATS;
    for s in 0..n {
        for kh in 0..kvh {
            for (k, &src) in chosen[s][kh].iter().enumerate() {
                let dst = num_evict[s] as usize + k;
                let (sb, stt) = windows.slot(s, src, kv.block_size);
                let (db, dt) = windows.slot(s, dst, kv.block_size);
                let h = kh as i64;
                let ks = foresightkv::kernels::PagedKvLayout::offset(&kv.key_strides, sb, stt, h);
                let kd = foresightkv::kernels::PagedKvLayout::offset(&kv.key_strides, db, dt, h);
                ek[kd..kd + hd].copy_from_slice(&key_before[ks..ks + hd]);
                let vs = foresightkv::kernels::PagedKvLayout::offset(&kv.value_strides, sb, stt, h)
                    + voff;
                let vd = foresightkv::kernels::PagedKvLayout::offset(&kv.value_strides, db, dt, h)
                    + voff;
                if fused {
                    ek[vd..vd + hd].copy_from_slice(&key_before[vs..vs + hd]);
                } else {
                    ev[vd..vd + hd].copy_from_slice(&value_before[vs..vs + hd]);
                }
                if with_stats {
                    let (ss, sd) = (layout.offset(sb, stt, h), layout.offset(db, dt, h));
                    es[sd..sd + row].copy_from_slice(&stats_before[ss..ss + row]);
                }
            }
        }
    }
    assert!(
        sc.key == ek,
        "key cache differs from the expected compaction"
    );
    assert!(
        sc.value == ev,
        "value cache differs from the expected compaction"
    );
    assert_same_bits("stats differ from the expected compaction", &stats, &es);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn decode_f32_matches_dense(shape in shapes(vec![16, 64, 128, 256], 40, 0)) { check_decode::<f32>(shape) }
    #[test]
    fn decode_f16_matches_dense(shape in shapes(vec![64, 128], 40, 0)) { check_decode::<f16>(shape) }
    #[test]
    fn decode_bf16_matches_dense(shape in shapes(vec![64, 256], 40, 0)) { check_decode::<bf16>(shape) }

    #[test]
    fn window_stats_f32_matches_dense(shape in shapes(vec![16, 64], 48, 1), mq in 1usize..40) { check_window_stats::<f32>(shape, mq) }
    #[test]
    fn window_stats_f16_matches_dense(shape in shapes(vec![64, 128], 40, 1), mq in 1usize..40) { check_window_stats::<f16>(shape, mq) }
    #[test]
    fn window_stats_bf16_matches_dense(shape in shapes(vec![64], 40, 1), mq in 1usize..40) { check_window_stats::<bf16>(shape, mq) }

    #[test]
    fn scorer_f32_matches_dense(shape in shapes(vec![16, 64], 24, 0)) { check_scorer::<f32>(shape) }
    #[test]
    fn scorer_bf16_matches_dense(shape in shapes(vec![64, 128], 24, 0)) { check_scorer::<bf16>(shape) }

    #[test]
    fn select_matches_repeated_argmax(shape in shapes(vec![16], 48, 0), protected in 0usize..8, frac in 0.0f64..=1.0, ties in any::<bool>()) {
        check_select(shape, protected, frac, ties)
    }

    #[test]
    fn compact_moves_survivors_to_the_tail(shape in shapes(vec![16, 64], 48, 0), with_stats in any::<bool>()) { check_compact::<f16>(shape, with_stats) }
    #[test]
    fn compact_f32_and_bf16(shape in shapes(vec![16, 128], 40, 0)) { check_compact::<f32>(shape.clone(), true); check_compact::<bf16>(shape, true) }
}

/// An eviction step (select, compact, advance live_start, free the blocks before it) leaves a
/// window whose decode attention equals dense attention over each head's survivors.
fn check_evict_then_decode(shape: Shape, protected: usize) {
    let mut sc = Scenario::<f32>::new(shape);
    let (n, kvh, hd, g, bs) = (
        sc.seq_lens.len(),
        sc.shape.kv_heads,
        sc.shape.head_dim,
        sc.shape.group,
        sc.shape.block_size,
    );
    let hq = kvh * g;
    let max_live = sc.max_live().max(1);
    let lens = sc.shape.live_lens.clone();
    let num_evict: Vec<i32> = lens
        .iter()
        .map(|&l| {
            let most = l.saturating_sub(protected) / bs;
            (sc.rng.random_range(0..=most) * bs) as i32
        })
        .collect();
    let scores: Vec<f32> = (0..n * kvh * max_live)
        .map(|_| uniform(&mut sc.rng, 1.0))
        .collect();
    let args = SelectArgs {
        num_kv_heads: kvh as i64,
        max_live: max_live as i64,
        num_protected: protected as i64,
    };
    let mut survivors = vec![0i32; scores.len()];
    select_survivors(
        &sc.seq_lens,
        &sc.live_starts,
        &args,
        &scores,
        &num_evict,
        &mut survivors,
    )
    .unwrap();
    sc.compact(max_live, &num_evict, &survivors, None);
    let mut tables = sc.block_tables.clone();
    let new_starts: Vec<i32> = (0..n).map(|s| sc.live_starts[s] + num_evict[s]).collect();
    for s in 0..n {
        for b in 0..(new_starts[s] as usize / bs) {
            tables[s * sc.bt_stride as usize + b] = -1;
        }
    }
    let dargs = DecodeArgs::contiguous(hq as i64, hd as i64);
    let query = sc.random_t(n * hq * hd, 2.0);
    let windows = foresightkv::kernels::LiveWindows {
        block_tables: &tables,
        block_table_stride: sc.bt_stride,
        seq_lens: &sc.seq_lens,
        live_starts: &new_starts,
    };
    let mut out = vec![0f32; n * hq * hd];
    sc.decode(&windows, &dargs, &query, &mut out);
    for s in 0..n {
        let keep = lens[s] - num_evict[s] as usize;
        for h in 0..hq {
            let kh = h / g;
            let row = &survivors[(s * kvh + kh) * max_live..][..keep];
            let ks: Vec<Vec<f32>> = row
                .iter()
                .map(|&i| sc.dense_k[s][kh][i as usize].clone())
                .collect();
            let vs: Vec<Vec<f32>> = row
                .iter()
                .map(|&i| sc.dense_v[s][kh][i as usize].clone())
                .collect();
            let want = naive_attend(&query[(s * hq + h) * hd..][..hd], &ks, &vs, dargs.scale);
            assert_close(
                &format!("post-eviction decode s{s} h{h}"),
                &out[(s * hq + h) * hd..][..hd],
                &want,
                1e-5,
                1e-4,
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn eviction_step_keeps_attention_exact_over_survivors(shape in shapes(vec![16, 64], 64, 0), protected in 0usize..20) {
        check_evict_then_decode(shape, protected)
    }
}

/// `window_stats` of one sequence with `live` zero keys (every visible slot gets the same
/// probability, so each value is a hand-computable fraction), one query head, head_dim 4; `old`
/// seeds the statistics of every slot.
fn uniform_stats(
    live: usize,
    n: usize,
    window: i64,
    mode: StatsMode,
    old: [f32; 8],
) -> Vec<[f32; 8]> {
    let d = 4;
    let rows = DenseRows::new(live, d, 1);
    let args = WindowStatsArgs::contiguous(1, n as i64, d as i64).with_stats(window, mode);
    let keys = vec![0f32; live * d];
    let queries = vec![0.5f32; n * d];
    let mut stats: Vec<f32> = (0..live).flat_map(|_| old).collect();
    window_stats(
        &rows.kv,
        &rows.windows(),
        &args,
        &queries,
        &[n as i32],
        &keys,
        &rows.stats,
        &mut stats,
    )
    .unwrap();
    stats
        .chunks_exact(8)
        .map(|c| c.try_into().unwrap())
        .collect()
}

/// Defect: the 0.9 decay was applied once per query (a carried 100 became 100 * 0.9^n); it is
/// applied once per eviction interval: decayed = 0.9 * old + sum.
#[test]
fn decayed_statistic_decays_once_per_interval() {
    let old = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0, 100.0];
    // live 4, 2 queries since the last eviction: row 0 sees slots 0..=2, row 1 sees 0..=3.
    let st = uniform_stats(4, 2, 2, StatsMode::Paper, old);
    let sum = 1.0 / 3.0 + 1.0 / 4.0;
    assert!(
        (st[0][STAT_DECAYED] - (0.9 * 100.0 + sum)).abs() < 1e-4,
        "{:?}",
        st[0]
    );
    assert!((st[0][STAT_CUMULATIVE] - (50.0 + sum)).abs() < 1e-4);
    // L = 128 queries over 200 live slots: the carried 100 keeps 90, not 100 * 0.9^128.
    let st = uniform_stats(200, 128, 128, StatsMode::Paper, old);
    let sum: f32 = (0..128).map(|j| 1.0 / (72 + j + 1) as f32).sum();
    assert!(
        (st[0][STAT_DECAYED] - (90.0 + sum)).abs() < 1e-3,
        "{:?}",
        st[0]
    );
    // A slot that entered since the last eviction starts from 0 (its old values are not read).
    assert!((st[199][STAT_DECAYED] - 1.0 / 200.0).abs() < 1e-6);
}

/// Defect: the first eviction took max/min/sum over every query since token 0. With window `L`
/// they cover the last `L` queries; the earlier ones only enter the cumulative statistics
/// (cumulative = F + S, decayed = 0.9 F + S).
#[test]
fn first_eviction_windows_the_last_l_queries_and_folds_the_rest() {
    // 6 live slots, 6 queries (from token 0), window 2: slot 0 gets 1/(j+1) from row j.
    let st = uniform_stats(6, 6, 2, StatsMode::Paper, [0.0; 8]);
    let (fold, win) = (
        1.0 + 1.0 / 2.0 + 1.0 / 3.0 + 1.0 / 4.0,
        1.0 / 5.0 + 1.0 / 6.0,
    );
    let s0 = st[0];
    assert!((s0[STAT_MAX] - 1.0 / 5.0).abs() < 1e-6, "{s0:?}");
    assert!((s0[STAT_MIN] - 1.0 / 6.0).abs() < 1e-6);
    assert!((s0[STAT_SUM] - win).abs() < 1e-6);
    assert!(
        (s0[STAT_SUM8] - win).abs() < 1e-6,
        "short sums see only the window"
    );
    assert!((s0[STAT_CUMULATIVE] - (fold + win)).abs() < 1e-5);
    assert!((s0[STAT_DECAYED] - (0.9 * fold + win)).abs() < 1e-5);
    // Slot 5 is seen by the last row only.
    assert!(
        (st[5][STAT_MAX] - 1.0 / 6.0).abs() < 1e-6 && (st[5][STAT_MIN] - 1.0 / 6.0).abs() < 1e-6
    );
    // window 0 = every row is in the window.
    let all = uniform_stats(6, 6, 0, StatsMode::Paper, [0.0; 8]);
    assert!(
        (all[0][STAT_SUM] - (fold + win)).abs() < 1e-5 && (all[0][STAT_MAX] - 1.0).abs() < 1e-6
    );
}

/// The official training features: sum8 = sum16 = sum32 = the window sum; the paper's are sums
/// over the last 8, 16 and 32 queries. Everything else agrees.
#[test]
fn official_mode_short_sums_equal_the_window_sum() {
    let old = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 7.0];
    // 100 live slots, 40 queries, window 40: slot 0 gets 1/(61 + j) from row j.
    let p = |j: usize| 1.0 / (61 + j) as f64;
    let last = |k: usize| (40 - k..40).map(p).sum::<f64>() as f32;
    let paper = uniform_stats(100, 40, 40, StatsMode::Paper, old)[0];
    let official = uniform_stats(100, 40, 40, StatsMode::Official, old)[0];
    let sum = last(40);
    for (k, want) in [
        (STAT_SUM8, last(8)),
        (STAT_SUM16, last(16)),
        (STAT_SUM32, last(32)),
    ] {
        assert!(
            (paper[k] - want).abs() < 1e-6,
            "paper stat {k}: {} vs {want}",
            paper[k]
        );
        assert!(
            (official[k] - sum).abs() < 1e-6,
            "official stat {k}: {} vs {sum}",
            official[k]
        );
    }
    for k in [STAT_MAX, STAT_MIN, STAT_SUM, STAT_CUMULATIVE, STAT_DECAYED] {
        assert_eq!(paper[k], official[k], "stat {k}");
    }
    assert!((paper[STAT_DECAYED] - (0.9 * 7.0 + sum)).abs() < 1e-5);
}
