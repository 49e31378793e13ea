//! The victim selection every policy shares: protect the newest `L` live entries and choose `num_evict`
//! victims among the rest of one (layer, KV head), either the top scores or a reproducible sample.

use super::philox::SampleKey;
use super::EvictError;
use crate::kernels::sample_survivors::{sample_row_draw, sample_survivors, SampleArgs};
use crate::kernels::select_survivors::top_victims;
use crate::kernels::{select_survivors, SelectArgs};
use serde::{Deserialize, Serialize};

/// How victims are chosen from the eviction scores (higher score = evicted first).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum VictimMode {
    /// Deterministic: the `num_evict` highest scores (ties: the older slot goes first).
    TopL,
    /// ForesightKV's sampling: the top `2 * num_evict` by score, then `num_evict` of them drawn by
    /// softmax(score / temperature) without replacement, as Gumbel top-k with Philox noise.
    Sample {
        /// Global seed of the Philox stream.
        seed: u64,
        /// Softmax temperature (> 0); the paper samples from softmax of the raw scores (1.0).
        temperature: f32,
    },
}

/// One (sequence, layer, KV head) selection request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VictimRequest {
    /// Newest live slots that are never evicted (the interval `L`).
    pub num_protected: usize,
    /// Victims to choose.
    pub num_evict: usize,
    /// The random stream of this decision (used by [`VictimMode::Sample`] only; its seed is
    /// replaced by the mode's seed).
    pub key: SampleKey,
}

/// Checks that `req` asks for no more victims than `scores` has unprotected slots, and that the
/// slots fit int32 indices.
fn check_request(scores: &[f32], req: &VictimRequest) -> Result<(), EvictError> {
    let live = scores.len();
    let unprotected = live.saturating_sub(req.num_protected);
    if req.num_evict > unprotected {
        return Err(EvictError::arg(
            "num_evict",
            format!(
                "{} victims, only {unprotected} unprotected of {live} live entries",
                req.num_evict
            ),
        ));
    }
    if live > i32::MAX as usize {
        return Err(EvictError::arg(
            "scores",
            format!("{live} live entries exceed i32 slot indices"),
        ));
    }
    Ok(())
}

/// Chooses victims among the unprotected live slots `0..scores.len() - num_protected`; returns their
/// slot indices ascending.
///
/// Sampling: candidates are the top `min(2 n, unprotected)` slots in the same total order as
/// [`select_survivors`]; each candidate slot `c` gets the key `score_c / temperature + G_c` (binary64,
/// `score` widened from f32, one division, one addition) where `G_c = key.gumbel(c)`, and the `n`
/// largest keys are the victims (equal keys: the smaller slot). Identical choices on any machine
/// that follows the [`super::philox`] contract.
pub fn select_victims(
    scores: &[f32],
    req: &VictimRequest,
    mode: &VictimMode,
) -> Result<Vec<usize>, EvictError> {
    check_request(scores, req)?;
    match *mode {
        VictimMode::TopL => Ok(top_victims(scores, req.num_protected, req.num_evict)?),
        VictimMode::Sample { seed, temperature } => {
            let mut victims = sample_victims(scores, req, seed, temperature)?.victims;
            victims.sort_unstable();
            Ok(victims)
        }
    }
}

/// One sampled victim choice in draw order: the candidate pool (the top `min(2 n, unprotected)`
/// slots by score, ascending) and the victims in the order of their Gumbel keys (largest first),
/// which is the order of a sequential softmax draw without replacement over the pool (the
/// Plackett-Luce order whose probability a trainer needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledVictims {
    /// Candidate slots, ascending.
    pub pool: Vec<usize>,
    /// Victim slots, first drawn first.
    pub victims: Vec<usize>,
}

/// The draw of [`VictimMode::Sample`] with seed `seed` and temperature `temperature` for `req`,
/// keeping the pool and the draw order; [`select_victims`] returns the same victims sorted.
pub fn sample_victims(
    scores: &[f32],
    req: &VictimRequest,
    seed: u64,
    temperature: f32,
) -> Result<SampledVictims, EvictError> {
    check_request(scores, req)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(EvictError::arg(
            "temperature",
            format!("{temperature} is not a positive finite number"),
        ));
    }
    if req.key.layer > 0xFFFF || req.key.head > 0xFFFF {
        return Err(EvictError::arg(
            "key",
            format!(
                "layer {} / head {} exceed the 16-bit Philox counter fields",
                req.key.layer, req.key.head
            ),
        ));
    }
    let key = SampleKey { seed, ..req.key };
    let (pool, victims) =
        sample_row_draw(scores, req.num_protected, req.num_evict, &key, temperature)?;
    Ok(SampledVictims { pool, victims })
}

/// A batch of per-(sequence, KV head) selections of one layer, in the layout of the kernels'
/// `select_survivors`: scores and survivors `[num_seqs, num_kv_heads, max_live]`.
#[derive(Debug, Clone, Copy)]
pub struct BatchSelect<'a> {
    /// Logical length of each sequence.
    pub seq_lens: &'a [i32],
    /// First live position of each sequence.
    pub live_starts: &'a [i32],
    /// Heads, row stride, protected window.
    pub args: SelectArgs,
    /// Eviction scores (higher = evicted first).
    pub scores: &'a [f32],
    /// Victims per sequence.
    pub num_evict: &'a [i32],
    /// Request id of each sequence (sampling key).
    pub requests: &'a [u32],
    /// Evictions each sequence has done before this one (sampling key).
    pub evictions: &'a [u32],
    /// Layer of this call (sampling key).
    pub layer: u32,
}

/// Writes, per (sequence `s`, KV head `kh`), the `live - num_evict[s]` survivors ascending to the
/// front of row `s * num_kv_heads + kh` of `survivors`. [`VictimMode::TopL`] is exactly the
/// kernels' `select_survivors`; [`VictimMode::Sample`] applies [`select_victims`] per row with key
/// `(seed, requests[s], layer, kh, evictions[s])`, the CPU reference a CUDA sampler must match.
pub fn select_survivors_batch(
    batch: &BatchSelect<'_>,
    mode: &VictimMode,
    survivors: &mut [i32],
) -> Result<(), EvictError> {
    let n = batch.seq_lens.len();
    if batch.requests.len() != n || batch.evictions.len() != n {
        return Err(EvictError::Shape(format!(
            "{} requests and {} eviction counts for {n} sequences",
            batch.requests.len(),
            batch.evictions.len()
        )));
    }
    if let VictimMode::TopL = mode {
        select_survivors(
            batch.seq_lens,
            batch.live_starts,
            &batch.args,
            batch.scores,
            batch.num_evict,
            survivors,
        )?;
        return Ok(());
    }
    let VictimMode::Sample { seed, temperature } = *mode else {
        unreachable!("TopL returned above")
    };
    let args = SampleArgs {
        select: batch.args,
        layer: batch.layer,
        seed,
        temperature,
    };
    sample_survivors(
        batch.seq_lens,
        batch.live_starts,
        &args,
        batch.scores,
        batch.num_evict,
        batch.requests,
        batch.evictions,
        survivors,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SampleKey {
        SampleKey {
            seed: 0,
            request: 7,
            layer: 3,
            head: 1,
            eviction: 2,
        }
    }

    #[test]
    fn top_l_picks_highest_unprotected() {
        let scores = [0.1, 5.0, 0.2, 4.0, 9.0, 9.0];
        let req = VictimRequest {
            num_protected: 2,
            num_evict: 2,
            key: key(),
        };
        assert_eq!(
            select_victims(&scores, &req, &VictimMode::TopL).unwrap(),
            vec![1, 3]
        );
    }

    #[test]
    fn too_many_victims_is_an_error() {
        let req = VictimRequest {
            num_protected: 2,
            num_evict: 3,
            key: key(),
        };
        assert!(matches!(
            select_victims(&[0.0; 4], &req, &VictimMode::TopL),
            Err(EvictError::InvalidArgument {
                name: "num_evict",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn batch_matches_per_row_selection(
            lives in proptest::collection::vec(8i32..40, 1..4),
            seed in any::<u64>(),
            sample in any::<bool>(),
        ) {
            let (heads, ml, prot) = (2usize, 40usize, 4i64);
            let n = lives.len();
            let scores: Vec<f32> = (0..n * heads * ml).map(|i| ((i * 7919 + seed as usize) % 101) as f32 / 10.0).collect();
            let num_evict: Vec<i32> = lives.iter().map(|&l| (l - prot as i32) / 2).collect();
            let requests: Vec<u32> = (0..n as u32).map(|r| r * 3 + 1).collect();
            let evictions: Vec<u32> = (0..n as u32).collect();
            let batch = BatchSelect {
                seq_lens: &lives,
                live_starts: &vec![0; n],
                args: SelectArgs { num_kv_heads: heads as i64, max_live: ml as i64, num_protected: prot },
                scores: &scores,
                num_evict: &num_evict,
                requests: &requests,
                evictions: &evictions,
                layer: 5,
            };
            let mode = if sample { VictimMode::Sample { seed, temperature: 1.0 } } else { VictimMode::TopL };
            let mut survivors = vec![-1i32; n * heads * ml];
            select_survivors_batch(&batch, &mode, &mut survivors).unwrap();
            for s in 0..n {
                let live = lives[s] as usize;
                for kh in 0..heads {
                    let row = (s * heads + kh) * ml;
                    let key = SampleKey { seed: 0, request: requests[s], layer: 5, head: kh as u32, eviction: evictions[s] };
                    let req = VictimRequest { num_protected: prot as usize, num_evict: num_evict[s] as usize, key };
                    let victims = select_victims(&scores[row..row + live], &req, &mode).unwrap();
                    let want: Vec<i32> = (0..live).filter(|i| !victims.contains(i)).map(|i| i as i32).collect();
                    prop_assert_eq!(&survivors[row..row + want.len()], want.as_slice());
                }
            }
        }

        #[test]
        fn sample_is_reproducible_and_within_top_2l(
            scores in proptest::collection::vec(-10f32..10.0, 4..200),
            seed in any::<u64>(),
            frac in 0.0f64..1.0,
        ) {
            let live = scores.len();
            let prot = live / 4;
            let n = ((live - prot) as f64 * frac / 2.0) as usize;
            let req = VictimRequest { num_protected: prot, num_evict: n, key: key() };
            let mode = VictimMode::Sample { seed, temperature: 1.0 };
            let a = select_victims(&scores, &req, &mode).unwrap();
            let b = select_victims(&scores, &req, &mode).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), n);
            let pool = top_victims(&scores, prot, (2 * n).min(live - prot)).unwrap();
            for v in &a {
                prop_assert!(pool.contains(v));
                prop_assert!(*v < live - prot);
            }
            prop_assert!(a.windows(2).all(|w| w[0] < w[1]));
        }

        #[test]
        fn top_l_victims_dominate_survivors(scores in proptest::collection::vec(-10f32..10.0, 1..100), n in 0usize..50) {
            let live = scores.len();
            let prot = live / 3;
            let n = n.min(live - prot);
            let req = VictimRequest { num_protected: prot, num_evict: n, key: key() };
            let v = select_victims(&scores, &req, &VictimMode::TopL).unwrap();
            let min_victim = v.iter().map(|&i| scores[i]).fold(f32::INFINITY, f32::min);
            for (i, &s) in scores[..live - prot].iter().enumerate() {
                if !v.contains(&i) {
                    prop_assert!(s <= min_victim);
                }
            }
        }

        #[test]
        fn sample_victims_keeps_the_pool_and_the_gumbel_order(scores in proptest::collection::vec(-5f32..5.0, 2..80), n in 1usize..30, seed in 0u64..1000) {
            let live = scores.len();
            let prot = live / 4;
            let n = n.min(live - prot);
            let req = VictimRequest { num_protected: prot, num_evict: n, key: key() };
            let drawn = sample_victims(&scores, &req, seed, 0.7).unwrap();
            let mut sorted = drawn.victims.clone();
            sorted.sort_unstable();
            let mode = VictimMode::Sample { seed, temperature: 0.7 };
            prop_assert_eq!(&sorted, &select_victims(&scores, &req, &mode).unwrap());
            prop_assert_eq!(&drawn.pool, &top_victims(&scores, prot, (2 * n).min(live - prot)).unwrap());
            let k = SampleKey { seed, ..key() };
            let keys: Vec<f64> = drawn.victims.iter().map(|&c| scores[c] as f64 / 0.7f32 as f64 + k.gumbel(c as u32)).collect();
            prop_assert!(keys.windows(2).all(|w| w[0] >= w[1]));
            for &c in drawn.pool.iter().filter(|c| !drawn.victims.contains(c)) {
                prop_assert!(scores[c] as f64 / 0.7f32 as f64 + k.gumbel(c as u32) <= keys[n - 1]);
            }
        }
    }
}
