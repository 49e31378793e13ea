//! Helpers shared by the integration tests: dense f64 math for the brute-force references,
//! written from the definitions and independent of the library (erf by its Taylor series, f64 dot
//! products, a max-shifted softmax), assertions several test files make, and the proptest case
//! count.
#![allow(dead_code)]

use foresightkv::evict::{EvictError, StatsMode};

/// erf by its Taylor series (exact to f64 for |x| < 4, ±1 beyond; torch's `nn.GELU()` is the erf
/// form); independent of the CPU reference's Chebyshev fit.
pub fn erf(x: f64) -> f64 {
    if x.abs() >= 4.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0f64);
    while term.abs() > 1e-17 {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// `a . b` of two f32 rows, each product and the sum in f64.
pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum::<f64>()
}

/// Softmax of `logits`, shifted by their max; a `-inf` (masked) logit gets probability 0.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
    logits.iter().map(|l| (l - m).exp() / z).collect()
}

/// Asserts `err` is the refusal of a scorer trained on `official` statistics where `paper` ones
/// are computed.
pub fn assert_official_scorer_refused(err: &EvictError) {
    assert!(
        matches!(
            err,
            EvictError::StatsModeMismatch {
                checkpoint: StatsMode::Official,
                computed: StatsMode::Paper
            }
        ),
        "{err}"
    );
}

/// Proptest cases: `FORESIGHTKV_PROPTEST_CASES` when set (and a number), else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("FORESIGHTKV_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
