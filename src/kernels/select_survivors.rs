//! CPU reference of `select_survivors`: per (sequence, KV head), the deterministic top-k eviction
//! choice over scored live entries, returned as the sorted list of survivors `compact` consumes.

use super::paged::{per_sequence, validate_starts};
use super::scorer_mlp::validate_slot_matrix;
use super::KernelError;
use serde::{Deserialize, Serialize};

/// Shape of a `select_survivors` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectArgs {
    /// KV heads (rows of scores per sequence).
    pub num_kv_heads: i64,
    /// Columns of the `[num_seqs, num_kv_heads, max_live]` score and survivor buffers.
    pub max_live: i64,
    /// Newest live slots that are never evicted.
    pub num_protected: i64,
}

/// Total-order key of an f32 score: larger key = larger score (positive NaN above +inf, -0 below
/// +0), identical on CPU and GPU.
pub fn score_key(x: f32) -> u32 {
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// Checks the arguments of a selection (shared by the CPU reference and the CUDA launcher, which
/// passes host mirrors of `seq_lens`, `live_starts` and `num_evict`).
pub fn validate_select(
    seq_lens: &[i32],
    live_starts: &[i32],
    args: &SelectArgs,
    num_evict: &[i32],
    scores_len: usize,
    survivors_len: usize,
) -> Result<(), KernelError> {
    validate_starts(seq_lens, live_starts, 1)?;
    super::paged::positive("num_kv_heads", args.num_kv_heads)?;
    if args.num_protected < 0 {
        return Err(KernelError::InvalidArgument {
            name: "num_protected",
            why: "must be >= 0".into(),
        });
    }
    per_sequence("eviction counts", num_evict.len(), seq_lens.len())?;
    let mut max_live = 0usize;
    for (s, &e) in num_evict.iter().enumerate() {
        let live = (seq_lens[s] - live_starts[s]) as i64;
        max_live = max_live.max(live as usize);
        let candidates = (live - args.num_protected).max(0);
        if e < 0 || e as i64 > candidates {
            return Err(KernelError::InvalidArgument {
                name: "num_evict",
                why: format!("sequence {s}: {e} evictions, only {candidates} unprotected entries"),
            });
        }
    }
    let n = seq_lens.len();
    validate_slot_matrix(
        "scores",
        max_live,
        args.max_live,
        n,
        args.num_kv_heads,
        scores_len,
    )?;
    validate_slot_matrix(
        "survivors",
        max_live,
        args.max_live,
        n,
        args.num_kv_heads,
        survivors_len,
    )
}

/// Picks, per (sequence `s`, KV head `kh`), the `num_evict[s]` highest-scoring entries among the
/// unprotected slots `0..live - num_protected` (ties: the older slot goes first) and writes the
/// `live - num_evict[s]` survivors, ascending, to the front of row `(s * num_kv_heads + kh)` of
/// `survivors` (`[num_seqs, num_kv_heads, max_live]` int32). Same contract as
/// `fkv_select_survivors` (csrc/select_survivors.cu).
pub fn select_survivors(
    seq_lens: &[i32],
    live_starts: &[i32],
    args: &SelectArgs,
    scores: &[f32],
    num_evict: &[i32],
    survivors: &mut [i32],
) -> Result<(), KernelError> {
    validate_select(
        seq_lens,
        live_starts,
        args,
        num_evict,
        scores.len(),
        survivors.len(),
    )?;
    let ml = args.max_live as usize;
    let mut evicted = Vec::new();
    for s in 0..seq_lens.len() {
        let live = (seq_lens[s] - live_starts[s]) as usize;
        let candidates = live.saturating_sub(args.num_protected as usize);
        for kh in 0..args.num_kv_heads as usize {
            let row = (s * args.num_kv_heads as usize + kh) * ml;
            let mut order: Vec<usize> = (0..candidates).collect();
            order.sort_by(|&a, &b| {
                score_key(scores[row + b])
                    .cmp(&score_key(scores[row + a]))
                    .then(a.cmp(&b))
            });
            evicted.clear();
            evicted.resize(live, false);
            for &i in &order[..num_evict[s] as usize] {
                evicted[i] = true;
            }
            let mut out = row;
            for (i, &gone) in evicted.iter().enumerate() {
                if !gone {
                    survivors[out] = i as i32;
                    out += 1;
                }
            }
        }
    }
    Ok(())
}

/// The `n` highest-scoring unprotected slots of one row of `live = scores.len()` slots, ascending:
/// the victims [`select_survivors`] chooses for that row (ties: the older slot).
pub fn top_victims(
    scores: &[f32],
    num_protected: usize,
    n: usize,
) -> Result<Vec<usize>, KernelError> {
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
