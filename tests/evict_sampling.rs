//! Victim sampling: reproducible across runs, keyed by (seed, request, layer, head, eviction),
//! distributed as softmax sampling without replacement over the top 2L.

use foresightkv::evict::{select_victims, SampleKey, VictimMode, VictimRequest};
use proptest::prelude::*;

fn req(n: usize, key: SampleKey) -> VictimRequest {
    VictimRequest {
        num_protected: 0,
        num_evict: n,
        key,
    }
}

/// The `n` victims sampled at temperature 1 from `scores` (none protected), seeded by `key.seed`.
fn sampled(scores: &[f32], n: usize, key: SampleKey) -> Vec<usize> {
    let mode = VictimMode::Sample {
        seed: key.seed,
        temperature: 1.0,
    };
    select_victims(scores, &req(n, key), &mode).unwrap()
}

#[test]
fn frequencies_follow_the_softmax() {
    // Two candidates, one victim: P(first) = e^a / (e^a + e^b).
    let scores = [1.0f32, 0.0];
    let trials = 20_000;
    let mut first = 0;
    for request in 0..trials {
        let key = SampleKey {
            seed: 5,
            request,
            ..SampleKey::default()
        };
        if sampled(&scores, 1, key) == [0] {
            first += 1;
        }
    }
    let p = first as f64 / trials as f64;
    let want = 1.0f64.exp() / (1.0f64.exp() + 1.0);
    assert!((p - want).abs() < 0.015, "{p} vs {want}");
}

#[test]
fn second_draw_is_without_replacement() {
    // Three candidates with scores (2, 1, 0), two victims (pool = all three): the kept one is the
    // last of a Plackett-Luce order; P(keep slot 2) = sum over the first two draws.
    let scores = [2.0f32, 1.0, 0.0];
    let w: Vec<f64> = scores.iter().map(|&s| (s as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let p_last = |k: usize| -> f64 {
        (0..3)
            .filter(|&a| a != k)
            .map(|a| w[a] / total * (w[3 - a - k] / (total - w[a])))
            .sum()
    };
    let trials = 30_000;
    let mut kept = [0usize; 3];
    for request in 0..trials {
        let key = SampleKey {
            seed: 9,
            request,
            layer: 1,
            head: 2,
            eviction: 3,
        };
        let v = sampled(&scores, 2, key);
        kept[(0..3).find(|i| !v.contains(i)).unwrap()] += 1;
    }
    for (k, &count) in kept.iter().enumerate() {
        let p = count as f64 / trials as f64;
        assert!(
            (p - p_last(k)).abs() < 0.015,
            "slot {k}: {p} vs {}",
            p_last(k)
        );
    }
}

#[test]
fn layer_or_head_beyond_16_bits_is_refused() {
    let key = SampleKey {
        seed: 0,
        request: 0,
        layer: 70_000,
        head: 0,
        eviction: 0,
    };
    assert!(select_victims(
        &[0.0; 4],
        &req(1, key),
        &VictimMode::Sample {
            seed: 0,
            temperature: 1.0
        }
    )
    .is_err());
    assert!(select_victims(
        &[0.0; 4],
        &req(1, SampleKey::default()),
        &VictimMode::Sample {
            seed: 0,
            temperature: 0.0
        }
    )
    .is_err());
}

proptest! {
    #[test]
    fn same_key_same_victims_other_key_usually_different(
        scores in proptest::collection::vec(-1f32..1.0, 64..128),
        seed in any::<u64>(),
        request in any::<u32>(),
    ) {
        let key = SampleKey { seed: 0, request, layer: 3, head: 1, eviction: 7 };
        let mode = VictimMode::Sample { seed, temperature: 1.0 };
        let n = 16;
        let a = select_victims(&scores, &VictimRequest { num_protected: 16, num_evict: n, key }, &mode).unwrap();
        let b = select_victims(&scores, &VictimRequest { num_protected: 16, num_evict: n, key }, &mode).unwrap();
        prop_assert_eq!(&a, &b);
        // Near-flat scores over a pool of 32: other streams almost surely choose other sets.
        let differ = (0..8u32)
            .filter(|&e| {
                let k2 = SampleKey { eviction: 100 + e, ..key };
                select_victims(&scores, &VictimRequest { num_protected: 16, num_evict: n, key: k2 }, &mode).unwrap() != a
            })
            .count();
        prop_assert!(differ >= 6, "only {differ} of 8 other streams differ");
    }

    #[test]
    fn tiny_temperature_is_top_l(
        scores in proptest::collection::vec(-5f32..5.0, 8..40).prop_filter("distinct", |v| {
            let mut s = v.clone(); s.sort_by(f32::total_cmp); s.windows(2).all(|w| w[1] - w[0] > 1e-3)
        }),
        seed in any::<u64>(),
    ) {
        let n = scores.len() / 4;
        let key = SampleKey::default();
        let cold = select_victims(&scores, &req(n, key), &VictimMode::Sample { seed, temperature: 1e-6 }).unwrap();
        let top = select_victims(&scores, &req(n, key), &VictimMode::TopL).unwrap();
        prop_assert_eq!(cold, top);
    }
}
