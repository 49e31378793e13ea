//! CPU reference of `sample_survivors` (csrc/sample_survivors.cu): ForesightKV's reproducible victim
//! sampling per (sequence, KV head), written as the sorted survivor lists `compact` consumes, like
//! [`super::select_survivors()`] but with victims drawn by Gumbel top-k over Philox noise.

use super::select_survivors::{top_victims, validate_select, SelectArgs};
use super::KernelError;
use crate::evict::philox::SampleKey;
use serde::{Deserialize, Serialize};

/// Largest head count: the head index is a 16-bit field of the Philox counter.
pub const MAX_SAMPLE_HEADS: i64 = 1 << 16;

/// Shape and sampling key of a `sample_survivors` call (one layer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleArgs {
    /// Heads, row stride and protected window, as for `select_survivors`.
    pub select: SelectArgs,
    /// Layer of this call (sampling key, below 65536).
    pub layer: u32,
    /// Global seed of the Philox stream.
    pub seed: u64,
    /// Softmax temperature (positive, finite).
    pub temperature: f32,
}

/// Checks the sampling key fields: a positive finite temperature, and layer and head count inside
/// the 16-bit fields of the Philox counter.
pub fn validate_sample_key(args: &SampleArgs) -> Result<(), KernelError> {
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        return Err(KernelError::InvalidArgument {
            name: "temperature",
            why: format!("{} is not a positive finite number", args.temperature),
        });
    }
    if args.layer > 0xFFFF {
        return Err(KernelError::InvalidArgument {
            name: "layer",
            why: format!(
                "{} exceeds the 16-bit Philox counter field (at most 65535)",
                args.layer
            ),
        });
    }
    if args.select.num_kv_heads > MAX_SAMPLE_HEADS {
        return Err(KernelError::InvalidSize {
            name: "num_kv_heads",
            value: args.select.num_kv_heads,
            why: "at most 65536: the head is a 16-bit Philox counter field",
        });
    }
    Ok(())
}

/// Checks the arguments of a sampled selection (shared by the CPU reference and the CUDA launcher,
/// which passes host mirrors of `seq_lens`, `live_starts` and `num_evict` and the lengths of its
/// device `requests` and `evictions`).
#[allow(clippy::too_many_arguments)]
pub fn validate_sample(
    seq_lens: &[i32],
    live_starts: &[i32],
    args: &SampleArgs,
    num_evict: &[i32],
    requests_len: usize,
    evictions_len: usize,
    scores_len: usize,
    survivors_len: usize,
) -> Result<(), KernelError> {
    validate_select(
        seq_lens,
        live_starts,
        &args.select,
        num_evict,
        scores_len,
        survivors_len,
    )?;
    validate_sample_key(args)?;
    let n = seq_lens.len();
    for (name, have) in [("requests", requests_len), ("evictions", evictions_len)] {
        if have < n {
            return Err(KernelError::BufferTooSmall {
                name,
                have,
                need: n,
            });
        }
    }
    Ok(())
}

/// The victims (ascending) of one row of `live = scores.len()` scored slots: the candidates are the
/// top `min(2 n, unprotected)` unprotected slots in [`super::score_key`] order (ties: the older
/// slot); candidate `c` gets the binary64 key `score_c / temperature + key.gumbel(c)` (one
/// division, one addition), and the `n = num_evict` largest keys are the victims (equal keys: the
/// smaller slot). `num_evict` must not exceed the unprotected slots.
pub fn sample_row_victims(
    scores: &[f32],
    num_protected: usize,
    num_evict: usize,
    key: &SampleKey,
    temperature: f32,
) -> Result<Vec<usize>, KernelError> {
    let (_, mut victims) = sample_row_draw(scores, num_protected, num_evict, key, temperature)?;
    victims.sort_unstable();
    Ok(victims)
}

/// The draw behind [`sample_row_victims`], kept in order: the candidate pool (the top
/// `min(2 num_evict, unprotected)` slots by score, ascending) and the victims by Gumbel key,
/// largest first (the order of a sequential softmax draw without replacement, which a trainer's
/// Plackett-Luce log-probability needs).
pub fn sample_row_draw(
    scores: &[f32],
    num_protected: usize,
    num_evict: usize,
    key: &SampleKey,
    temperature: f32,
) -> Result<(Vec<usize>, Vec<usize>), KernelError> {
    let unprotected = scores.len().saturating_sub(num_protected);
    let pool_len = (2 * num_evict).min(unprotected);
    let pool = top_victims(scores, num_protected, pool_len)?;
    let mut keyed: Vec<(f64, usize)> = pool
        .iter()
        .map(|&c| {
            (
                scores[c] as f64 / temperature as f64 + key.gumbel(c as u32),
                c,
            )
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let victims = keyed[..num_evict].iter().map(|&(_, c)| c).collect();
    Ok((pool, victims))
}

/// Writes, per (sequence `s`, KV head `kh`), the `live - num_evict[s]` survivors, ascending, to the
/// front of row `s * num_kv_heads + kh` of `survivors` (`[num_seqs, num_kv_heads, max_live]`
/// int32), the victims drawn by [`sample_row_victims`] with key `(seed, requests[s], layer, kh,
/// evictions[s])`. Same contract as `fkv_sample_survivors` (csrc/sample_survivors.cu), bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn sample_survivors(
    seq_lens: &[i32],
    live_starts: &[i32],
    args: &SampleArgs,
    scores: &[f32],
    num_evict: &[i32],
    requests: &[u32],
    evictions: &[u32],
    survivors: &mut [i32],
) -> Result<(), KernelError> {
    validate_sample(
        seq_lens,
        live_starts,
        args,
        num_evict,
        requests.len(),
        evictions.len(),
        scores.len(),
        survivors.len(),
    )?;
    let (heads, ml) = (
        args.select.num_kv_heads as usize,
        args.select.max_live as usize,
    );
    for s in 0..seq_lens.len() {
        let live = (seq_lens[s] - live_starts[s]) as usize;
        for kh in 0..heads {
            let row = (s * heads + kh) * ml;
            let key = SampleKey {
                seed: args.seed,
                request: requests[s],
                layer: args.layer,
                head: kh as u32,
                eviction: evictions[s],
            };
            let victims = sample_row_victims(
                &scores[row..row + live],
                args.select.num_protected as usize,
                num_evict[s] as usize,
                &key,
                args.temperature,
            )?;
            let mut out = row;
            let mut next = victims.iter().peekable();
            for i in 0..live {
                if next.peek() == Some(&&i) {
                    next.next();
                } else {
                    survivors[out] = i as i32;
                    out += 1;
                }
            }
        }
    }
    Ok(())
}
