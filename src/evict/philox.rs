//! Counter-based randomness for victim sampling: Philox4x32-10 (Salmon et al., SC'11, as in
//! Random123 and cuRAND) and the exact floating-point recipe that turns its output into uniform and
//! Gumbel variates, written so a CUDA kernel can reproduce every bit.
//!
//! Bit-exactness contract for the GPU side: the Philox rounds are integer-only; [`uniform`] is exact
//! integer-to-double conversion and one power-of-two scale; [`det_ln`] uses only IEEE-754 binary64
//! `+ - * /` in the order written here (compile the CUDA twin with `-fmad=false` or use
//! `__dadd_rn`/`__dmul_rn`/`__ddiv_rn`, so no multiply-add is fused) and bit manipulation. No
//! library `log`/`exp` is called anywhere, so the results do not depend on a math library.

/// First Philox4x32 multiplier.
pub const PHILOX_M0: u32 = 0xD251_1F53;
/// Second Philox4x32 multiplier.
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// First Weyl key increment (golden ratio).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
/// Second Weyl key increment (sqrt(3) - 1).
pub const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with `rounds` rounds on counter `ctr` and key `key` (Random123's `philox4x32_R`).
pub fn philox4x32(rounds: u32, ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for r in 0..rounds {
        if r > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = PHILOX_M0 as u64 * c[0] as u64;
        let p1 = PHILOX_M1 as u64 * c[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Philox4x32-10, the standard 10-round variant.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32(10, ctr, key)
}

/// Everything that names one eviction decision: the random stream of a victim choice.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct SampleKey {
    /// Global seed (the Philox key).
    pub seed: u64,
    /// Request id (callers reduce wider ids to 32 bits).
    pub request: u32,
    /// Layer index (< 65536).
    pub layer: u32,
    /// KV head index (< 65536).
    pub head: u32,
    /// How many evictions this sequence has done before this one.
    pub eviction: u32,
}

impl SampleKey {
    /// The 4 Philox output words of live slot `entry`: counter
    /// `[entry, eviction, layer << 16 | head, request]`, key `[seed_lo, seed_hi]`.
    /// `layer` and `head` above 65535 are reduced mod 65536 (checked by the victim selection).
    pub fn words(&self, entry: u32) -> [u32; 4] {
        let lh = ((self.layer & 0xFFFF) << 16) | (self.head & 0xFFFF);
        philox4x32_10(
            [entry, self.eviction, lh, self.request],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Uniform variate of live slot `entry`, see [`uniform`].
    pub fn uniform(&self, entry: u32) -> f64 {
        uniform(self.words(entry))
    }

    /// Standard Gumbel variate of live slot `entry`: `-ln(-ln(u))` with [`det_ln`].
    pub fn gumbel(&self, entry: u32) -> f64 {
        -det_ln(-det_ln(self.uniform(entry)))
    }
}

/// Uniform in the open interval (0, 1) from Philox words 0 and 1: the 52-bit integer
/// `n = (w0 << 20) | (w1 >> 12)`, then `(n + 0.5) * 2^-52` (both steps exact in binary64).
pub fn uniform(w: [u32; 4]) -> f64 {
    let n = ((w[0] as u64) << 20) | ((w[1] >> 12) as u64);
    (n as f64 + 0.5) * (1.0 / 4_503_599_627_370_496.0)
}

/// ln 2 in binary64.
const LN2: f64 = std::f64::consts::LN_2;

/// Natural log of a positive normal binary64 number with a fixed sequence of IEEE operations
/// (relative error below 1e-15), so CPU and GPU agree bit for bit.
///
/// `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`; `t = (m - 1) / (m + 1)`;
/// `ln m = 2 t (1 + t^2/3 + t^4/5 + ... + t^22/23)` by Horner from the highest term (each
/// coefficient the binary64 quotient `1.0 / (2k + 1)`); `ln x = e * ln2 + ln m`.
/// Non-positive, subnormal and non-finite inputs return NaN (callers never pass them).
pub fn det_ln(x: f64) -> f64 {
    if !(x.is_finite() && x >= f64::MIN_POSITIVE) {
        return f64::NAN;
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7FF) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut p = 1.0 / 23.0;
    let mut k = 11;
    while k > 0 {
        k -= 1;
        p = p * t2 + 1.0 / (2 * k + 1) as f64;
    }
    (e as f64) * LN2 + 2.0 * t * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random123 `kat_vectors`, the three `philox4x32 10` lines (counter, key, expected).
    const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
            [0xffffffff, 0xffffffff],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];

    #[test]
    fn philox_known_answers() {
        for (ctr, key, want) in KAT {
            assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
        }
    }

    #[test]
    fn uniform_extremes_stay_open() {
        assert!(uniform([0, 0, 0, 0]) > 0.0);
        assert!(uniform([u32::MAX, u32::MAX, 0, 0]) < 1.0);
    }

    proptest! {
        #[test]
        fn det_ln_matches_libm(x in 1e-300f64..1e300) {
            let want = x.ln();
            let got = det_ln(x);
            prop_assert!((got - want).abs() <= 4e-16 * want.abs().max(1.0), "{x}: {got} vs {want}");
        }

        #[test]
        fn uniform_in_open_unit_interval(w in any::<[u32; 4]>()) {
            let u = uniform(w);
            prop_assert!(u > 0.0 && u < 1.0);
        }

        #[test]
        fn streams_differ_per_coordinate(seed in any::<u64>(), entry in 0u32..100000) {
            let k = SampleKey { seed, request: 1, layer: 2, head: 3, eviction: 4 };
            let base = k.words(entry);
            prop_assert_ne!(base, SampleKey { head: 5, ..k }.words(entry));
            prop_assert_ne!(base, SampleKey { eviction: 5, ..k }.words(entry));
            prop_assert_ne!(base, k.words(entry + 1));
        }
    }
}
