//! CPU reference of `scorer_mlp`: the per-(layer, KV head) ForesightKV MLP
//! `concat(k, v, stats) -> Linear(16) -> GELU -> Linear(1)` over every live entry.

use super::paged::{fits, LiveWindows, PagedKvLayout, StatsLayout, NUM_STATS, SCORER_HIDDEN};
use super::KernelError;
use crate::Element;

/// One layer's scorer weights, f32, one MLP per KV head.
///
/// Input features of entry `i` of KV head `kh` are `k_i` (head_dim), `v_i` (head_dim), then its
/// statistics row (`group_size * 8`, query head major as in [`StatsLayout`]).
/// `w1`: `[num_kv_heads, 16, in_dim]`, `b1`: `[num_kv_heads, 16]`, `w2`: `[num_kv_heads, 16]`,
/// `b2`: `[num_kv_heads]`, all contiguous.
#[derive(Debug, Clone, Copy)]
pub struct ScorerWeights<'a> {
    /// First layer weights.
    pub w1: &'a [f32],
    /// First layer bias.
    pub b1: &'a [f32],
    /// Second layer weights.
    pub w2: &'a [f32],
    /// Second layer bias.
    pub b2: &'a [f32],
}

/// Input width of the scorer: `2 * head_dim + 8 * group_size`.
pub fn scorer_in_dim(head_dim: i64, group_size: i64) -> usize {
    let width = 2 * head_dim as i128 + NUM_STATS as i128 * group_size as i128;
    usize::try_from(width).unwrap_or(usize::MAX)
}

/// Checks weight buffer lengths for `num_kv_heads` MLPs of input width `in_dim`.
pub fn validate_scorer_lens(
    num_kv_heads: usize,
    in_dim: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
) -> Result<(), KernelError> {
    let want = [
        (
            "w1",
            w1,
            num_kv_heads
                .saturating_mul(SCORER_HIDDEN)
                .saturating_mul(in_dim),
        ),
        ("b1", b1, num_kv_heads.saturating_mul(SCORER_HIDDEN)),
        ("w2", w2, num_kv_heads.saturating_mul(SCORER_HIDDEN)),
        ("b2", b2, num_kv_heads),
    ];
    for (name, have, need) in want {
        if have != need {
            return Err(KernelError::ShapeMismatch(format!(
                "scorer {name} has {have} floats, expected {need}"
            )));
        }
    }
    Ok(())
}

/// Checks a `[num_seqs, num_kv_heads, max_live]` per-slot buffer covers every live window.
pub fn validate_slot_matrix(
    name: &'static str,
    windows_max_live: usize,
    max_live: i64,
    num_seqs: usize,
    num_kv_heads: i64,
    len: usize,
) -> Result<(), KernelError> {
    if max_live < 0 || (max_live as usize) < windows_max_live {
        return Err(KernelError::InvalidArgument {
            name: "max_live",
            why: format!("{max_live} is below the longest live window ({windows_max_live})"),
        });
    }
    let need = (num_seqs as u128) * (num_kv_heads.max(0) as u128) * (max_live as u128);
    fits(name, len, usize::try_from(need).unwrap_or(usize::MAX))
}

/// Exact (erf) GELU, as PyTorch's default `nn.GELU()`.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

/// The error function, via the Chebyshev fit of erfc (relative error < 1.2e-7), in f64.
fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    let r = 1.0 - erfc;
    (if x >= 0.0 { r } else { -r }) as f32
}

/// Scores every live entry: `scores[(s * num_kv_heads + kh) * max_live + i]` = the MLP of KV head
/// `kh` on live slot `i` of sequence `s` (higher = more likely evicted). Slots past a sequence's
/// live length are not written. Same contract as `fkv_scorer_mlp` (csrc/scorer_mlp.cu).
#[allow(clippy::too_many_arguments)]
pub fn scorer_mlp<T: Element>(
    kv: &PagedKvLayout,
    windows: &LiveWindows<'_>,
    key_cache: &[T],
    value_cache: &[T],
    stats_layout: &StatsLayout,
    stats: &[f32],
    weights: &ScorerWeights<'_>,
    max_live: i64,
    scores: &mut [f32],
) -> Result<(), KernelError> {
    kv.validate(key_cache.len(), value_cache.len())?;
    windows.validate(kv.block_size, kv.num_blocks)?;
    let g = stats_layout.group_size;
    stats_layout.validate(kv, g * kv.num_kv_heads, stats.len())?;
    let in_dim = scorer_in_dim(kv.head_dim, g);
    let nkv = kv.num_kv_heads as usize;
    validate_scorer_lens(
        nkv,
        in_dim,
        weights.w1.len(),
        weights.b1.len(),
        weights.w2.len(),
        weights.b2.len(),
    )?;
    validate_slot_matrix(
        "scores",
        windows.max_live(),
        max_live,
        windows.num_seqs(),
        kv.num_kv_heads,
        scores.len(),
    )?;
    let hd = kv.head_dim as usize;
    let row = stats_layout.row();
    let mut x = vec![0f32; in_dim];
    for s in 0..windows.num_seqs() {
        for kh in 0..nkv {
            let w1 = &weights.w1[kh * SCORER_HIDDEN * in_dim..(kh + 1) * SCORER_HIDDEN * in_dim];
            for i in 0..windows.live_len(s) {
                let (b, t) = windows.slot(s, i, kv.block_size);
                let k0 = PagedKvLayout::offset(&kv.key_strides, b, t, kh as i64);
                let v0 = PagedKvLayout::offset(&kv.value_strides, b, t, kh as i64);
                let s0 = stats_layout.offset(b, t, kh as i64);
                for d in 0..hd {
                    x[d] = key_cache[k0 + d].to_f32();
                    x[hd + d] = value_cache[v0 + d].to_f32();
                }
                x[2 * hd..].copy_from_slice(&stats[s0..s0 + row]);
                let mut out = weights.b2[kh];
                for u in 0..SCORER_HIDDEN {
                    let wrow = &w1[u * in_dim..(u + 1) * in_dim];
                    let pre: f32 = weights.b1[kh * SCORER_HIDDEN + u]
                        + wrow.iter().zip(&x).map(|(w, v)| w * v).sum::<f32>();
                    out += weights.w2[kh * SCORER_HIDDEN + u] * gelu(pre);
                }
                scores[(s * nkv + kh) * max_live as usize + i] = out;
            }
        }
    }
    Ok(())
}
