//! The victim selection every policy shares: protect the newest `L` live entries and choose `num_evict`
//! victims among the rest of one (layer, KV head), either the top scores or a reproducible sample.

use super::philox::SampleKey;
use super::EvictError;
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
    match *mode {
        VictimMode::TopL => top_by_score(scores, req.num_protected, req.num_evict),
        VictimMode::Sample { seed, temperature } => {
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
            let pool = (2 * req.num_evict).min(unprotected);
            let candidates = top_by_score(scores, req.num_protected, pool)?;
            let mut keyed: Vec<(f64, usize)> = candidates
                .into_iter()
                .map(|c| {
                    (
                        scores[c] as f64 / temperature as f64 + key.gumbel(c as u32),
                        c,
                    )
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut victims: Vec<usize> = keyed[..req.num_evict].iter().map(|&(_, c)| c).collect();
            victims.sort_unstable();
            Ok(victims)
        }
    }
}

/// The `n` highest-scoring unprotected slots (ascending), through the kernels' `select_survivors`.
fn top_by_score(scores: &[f32], num_protected: usize, n: usize) -> Result<Vec<usize>, EvictError> {
    let live = scores.len();
    let args = SelectArgs {
        num_kv_heads: 1,
        max_live: live as i64,
        num_protected: num_protected as i64,
    };
    let mut survivors = vec![0i32; live];
    select_survivors(
        &[live as i32],
        &[0],
        &args,
        scores,
        &[n as i32],
        &mut survivors,
    )?;
    let mut kept = vec![false; live];
    for &s in &survivors[..live - n] {
        kept[s as usize] = true;
    }
    Ok((0..live).filter(|&i| !kept[i]).collect())
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
            let pool = top_by_score(&scores, prot, (2 * n).min(live - prot)).unwrap();
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
            for i in 0..live - prot {
                if !v.contains(&i) {
                    prop_assert!(scores[i] <= min_victim);
                }
            }
        }
    }
}
