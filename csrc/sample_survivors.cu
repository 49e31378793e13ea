// sample_survivors: per (seq, KV head) ForesightKV's reproducible victim sampling, the GPU twin of
// its CPU reference kernels::sample_survivors (src/kernels/sample_survivors.rs).
//
// 1. Candidates: the top pool = min(2 n, unprotected) slots by the total-order score key (ties:
//    the lower slot), found like select_survivors (csrc/include/fkv_select.cuh): a radix select
//    (8 bits a pass) gives the threshold key and how many keys equal to it are in; one block scan
//    turns that count into a slot bound (ties are taken from the lowest slots up).
// 2. Each candidate slot c gets key_c = score_c / T + G_c in binary64, G_c the Gumbel variate of
//    Philox4x32-10 with counter [c, eviction, layer << 16 | head, request] and key
//    [seed_lo, seed_hi] (src/evict/philox.rs). Every floating-point step is an explicit _rn
//    intrinsic, which is never fused into a multiply-add, so the result does not depend on the
//    global -fmad setting of the single translation unit build.rs compiles.
// 3. The n largest keys (total order of the binary64 bits, equal keys: the lower slot) are the
//    victims: a second radix select over the 64-bit order keys (recomputed each pass, no workspace).
// 4. The survivors are written ascending to the front of the row, as select_survivors does.
// Grid (kv_head, seq), SAMPLE_THREADS threads.
#include "fkv_common.cuh"
#include "fkv_select.cuh"

namespace fkv_sample {

constexpr int SAMPLE_THREADS = FKV_SAMPLE_THREADS;

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

// Binary64 constants by bit pattern (std::f64::consts::LN_2, SQRT_2, f64::MIN_POSITIVE, 2^-52,
// 2^-149), so no decimal literal conversion is involved.
__device__ __forceinline__ double ln2() { return __longlong_as_double(0x3FE62E42FEFA39EFLL); }
__device__ __forceinline__ double sqrt2() { return __longlong_as_double(0x3FF6A09E667F3BCDLL); }
__device__ __forceinline__ double min_normal() { return __longlong_as_double(0x0010000000000000LL); }
__device__ __forceinline__ double two_m52() { return __longlong_as_double(0x3CB0000000000000LL); }
__device__ __forceinline__ double two_m149() { return __longlong_as_double(0x36A0000000000000LL); }
__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7FF8000000000000LL); }

// Philox4x32-10 (Random123 philox4x32_R with R = 10).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k.x += PHILOX_W0;
      k.y += PHILOX_W1;
    }
    const uint32_t hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
    const uint32_t hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// philox::uniform: (((w0 << 20) | (w1 >> 12)) + 0.5) * 2^-52, every step exact.
__device__ __forceinline__ double uniform(uint4 w) {
  const unsigned long long n = ((unsigned long long)w.x << 20) | (unsigned long long)(w.y >> 12);
  return __dmul_rn(__dadd_rn(__ull2double_rn(n), 0.5), two_m52());
}

// philox::det_ln: the same binary64 operations in the same order.
__device__ double det_ln(double x) {
  const unsigned long long bits = (unsigned long long)__double_as_longlong(x);
  const bool finite = ((bits >> 52) & 0x7FFull) != 0x7FFull;
  if (!(finite && x >= min_normal())) return quiet_nan();
  long long e = (long long)((bits >> 52) & 0x7FFull) - 1023;
  double m = __longlong_as_double((long long)((bits & 0x000FFFFFFFFFFFFFull) | (1023ull << 52)));
  if (m > sqrt2()) {
    m = __dmul_rn(m, 0.5);
    e += 1;
  }
  const double t = __ddiv_rn(__dsub_rn(m, 1.0), __dadd_rn(m, 1.0));
  const double t2 = __dmul_rn(t, t);
  double p = __ddiv_rn(1.0, 23.0);
  for (int k = 10; k >= 0; --k) p = __dadd_rn(__dmul_rn(p, t2), __ddiv_rn(1.0, (double)(2 * k + 1)));
  return __dadd_rn(__dmul_rn(__ll2double_rn(e), ln2()), __dmul_rn(__dmul_rn(2.0, t), p));
}

// Exact f32 -> f64 widening of a non-NaN value; subnormals are scaled by hand so a flush-to-zero
// build flag cannot change them.
__device__ __forceinline__ double widen(float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7F800000u) != 0) return (double)x;
  const double mag = __dmul_rn(__uint2double_rn(u & 0x007FFFFFu), two_m149());
  return (u & 0x80000000u) ? -mag : mag;
}

// Sampling key of a slot: score / T + gumbel in binary64. A NaN score gives what the CPU's
// division and addition propagate: the quieted widened NaN, sign and payload kept.
__device__ __forceinline__ double sample_key(float score, double temperature, uint4 words) {
  const uint32_t u = __float_as_uint(score);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0) {
    const unsigned long long b = ((unsigned long long)(u >> 31) << 63) | (0x7FFull << 52) |
                                 (1ull << 51) | ((unsigned long long)(u & 0x007FFFFFu) << 29);
    return __longlong_as_double((long long)b);
  }
  const double g = -det_ln(-det_ln(uniform(words)));
  return __dadd_rn(__ddiv_rn(widen(score), temperature), g);
}

// Total-order key of a binary64 (f64::total_cmp): larger key = later in the order.
__device__ __forceinline__ unsigned long long order_key(double x) {
  const unsigned long long u = (unsigned long long)__double_as_longlong(x);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

}  // namespace fkv_sample

extern "C" __global__ void __launch_bounds__(fkv_sample::SAMPLE_THREADS)
    fkv_sample_survivors(const fkv_sample_params p) {
  using namespace fkv_sample;
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  const fkv::SelectRow row =
      fkv::select_row(p.win, p.scores, p.num_evict, p.survivors, p.num_kv_heads, p.max_live, p.num_protected);
  const int64_t live = row.live, cand = row.cand, n = row.evict;
  const int64_t pool = 2 * n < cand ? 2 * n : cand;
  const float *scores = row.scores;
  const uint2 pkey = make_uint2((uint32_t)p.seed, (uint32_t)(p.seed >> 32));
  const uint32_t lane_word = ((p.layer & 0xFFFFu) << 16) | ((uint32_t)kvh & 0xFFFFu);
  const uint32_t eviction = p.evictions[s], request = p.requests[s];
  const double temperature = widen(p.temperature);

  // Stage 1: candidate i iff key1 > thr1, or key1 == thr1 and i < cut1 (all unprotected slots
  // when the pool is all of them: every key is >= 0 and cut1 = cand).
  uint32_t thr1 = 0;
  int64_t cut1 = pool == cand ? cand : 0;
  auto key1 = [&](int64_t i, uint32_t *k) {
    *k = fkv::score_key(scores[i]);
    return true;
  };
  if (n > 0 && pool < cand) {
    int ties1;
    fkv::radix_top<SAMPLE_THREADS, uint32_t>(cand, (int)pool, key1, &thr1, &ties1);
    cut1 = fkv::tie_cutoff<SAMPLE_THREADS, uint32_t>(cand, key1, thr1, ties1);
  }
  auto key2 = [&](int64_t i, unsigned long long *k) {
    if (n == 0 || i >= cand) return false;
    const float sc = scores[i];
    const uint32_t k1 = fkv::score_key(sc);
    if (!(k1 > thr1 || (k1 == thr1 && i < cut1))) return false;
    const uint4 words = philox4x32_10(make_uint4((uint32_t)i, eviction, lane_word, request), pkey);
    *k = order_key(sample_key(sc, temperature, words));
    return true;
  };

  // Stage 2: victim i iff candidate and key2 > thr2, or key2 == thr2 and i < cut2.
  unsigned long long thr2 = 0;
  int64_t cut2 = 0;
  if (n > 0) {
    int ties2;
    fkv::radix_top<SAMPLE_THREADS, unsigned long long>(cand, (int)n, key2, &thr2, &ties2);
    cut2 = fkv::tie_cutoff<SAMPLE_THREADS, unsigned long long>(cand, key2, thr2, ties2);
  }

  fkv::write_survivors<SAMPLE_THREADS>(live, p.max_live, row.out, [&](int64_t i) {
    unsigned long long k2;
    return key2(i, &k2) && (k2 > thr2 || (k2 == thr2 && i < cut2));
  });
}
