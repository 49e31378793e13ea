// sample_survivors: per (seq, KV head) ForesightKV's reproducible victim sampling, the GPU twin of
// evict::select_survivors_batch with VictimMode::Sample (src/evict/select.rs).
//
// 1. Candidates: the top pool = min(2 n, unprotected) slots by the total-order score key (ties:
//    the lower slot), found like select_survivors: a radix select (8 bits a pass) gives the
//    threshold key and how many keys equal to it are in; one block scan turns that count into a
//    slot bound (ties are taken from the lowest slots up).
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

namespace fkv_sample {

constexpr int SAMPLE_THREADS = 256;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;

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

// Exclusive prefix sum of v over the block; *total receives the block sum. All threads call it.
__device__ int block_scan(int v, int *total) {
  __shared__ int warp_sums[SAMPLE_WARPS];
  __shared__ int sum_all;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
      const int t = warp_sums[w];
      warp_sums[w] = acc;
      acc += t;
    }
    sum_all = acc;
  }
  __syncthreads();
  const int r = warp_sums[warp] + x - v;
  *total = sum_all;
  __syncthreads();
  return r;
}

// Among slots i in [0, n) where key_of(i, &key) holds, the threshold key of the k largest (k >= 1,
// at most the number of such slots): *thr = the k-th largest key, *ties = how many keys equal to
// it belong to the k. All threads call it and receive the same results.
template <typename K, typename KeyOf>
__device__ void radix_top(int64_t n, int k, KeyOf key_of, K *thr, int *ties) {
  __shared__ unsigned int hist[256];
  __shared__ K prefix_s, mask_s;
  __shared__ int remaining_s;
  if (threadIdx.x == 0) {
    prefix_s = 0;
    mask_s = 0;
    remaining_s = k;
  }
  __syncthreads();
  for (int shift = (int)sizeof(K) * 8 - 8; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += SAMPLE_THREADS) hist[d] = 0;
    __syncthreads();
    const K prefix = prefix_s, mask = mask_s;
    for (int64_t i = threadIdx.x; i < n; i += SAMPLE_THREADS) {
      K key;
      if (key_of(i, &key) && (key & mask) == prefix) atomicAdd(&hist[(unsigned)(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (above + (int)hist[d] >= remaining_s) break;
        above += (int)hist[d];
      }
      remaining_s -= above;
      prefix_s = prefix | ((K)d << shift);
      mask_s = mask | ((K)255 << shift);
    }
    __syncthreads();
  }
  *thr = prefix_s;
  *ties = remaining_s;
  __syncthreads();
}

// The slot bound that takes the `ties` lowest slots whose key equals thr: one past the last of
// them (0 when ties is 0). All threads call it and receive the same result.
template <typename K, typename KeyOf>
__device__ int64_t tie_cutoff(int64_t n, KeyOf key_of, K thr, int ties) {
  __shared__ long long cut_s;
  if (threadIdx.x == 0) cut_s = 0;
  __syncthreads();
  int base = 0;
  for (int64_t c0 = 0; c0 < n && base < ties; c0 += SAMPLE_THREADS) {
    const int64_t i = c0 + threadIdx.x;
    K key;
    const int tie = (i < n && key_of(i, &key) && key == thr) ? 1 : 0;
    int total;
    const int rank = base + block_scan(tie, &total);
    if (tie && rank == ties - 1) cut_s = i + 1;
    base += total;
  }
  __syncthreads();
  const int64_t cut = cut_s;
  __syncthreads();
  return cut;
}

}  // namespace fkv_sample

extern "C" __global__ void __launch_bounds__(fkv_sample::SAMPLE_THREADS)
    fkv_sample_survivors(const fkv_sample_params p) {
  using namespace fkv_sample;
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  const int64_t live = fkv::live_len(p.win, s);
  int64_t cand = live - p.num_protected;
  if (cand < 0) cand = 0;
  int64_t n = p.num_evict[s];
  if (n < 0) n = 0;
  if (n > cand) n = cand;
  const int64_t pool = 2 * n < cand ? 2 * n : cand;
  const float *scores = p.scores + (s * p.num_kv_heads + kvh) * p.max_live;
  int32_t *out = p.survivors + (s * p.num_kv_heads + kvh) * p.max_live;
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
    radix_top<uint32_t>(cand, (int)pool, key1, &thr1, &ties1);
    cut1 = tie_cutoff<uint32_t>(cand, key1, thr1, ties1);
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
    radix_top<unsigned long long>(cand, (int)n, key2, &thr2, &ties2);
    cut2 = tie_cutoff<unsigned long long>(cand, key2, thr2, ties2);
  }

  int keep_base = 0;
  for (int64_t c0 = 0; c0 < live; c0 += SAMPLE_THREADS) {
    const int64_t i = c0 + threadIdx.x;
    unsigned long long k2;
    const bool victim = i < live && key2(i, &k2) && (k2 > thr2 || (k2 == thr2 && i < cut2));
    const int keep = (i < live) && !victim;
    int keep_total;
    const int pos = keep_base + block_scan(keep, &keep_total);
    if (keep && pos < p.max_live) out[pos] = (int32_t)i;
    keep_base += keep_total;
  }
}
