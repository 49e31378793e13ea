// scorer_mlp: per (seq, KV head, live slot) the ForesightKV MLP concat(k, v, stats) -> 16 -> GELU
// -> 1. One warp per slot: lanes split the input features, 16 hidden sums reduced across the warp.
// Grid (kv_head, seq, slot chunk of SC_CHUNK), 128 threads. CPU reference: src/kernels/scorer_mlp.rs.
#include "fkv_common.cuh"

namespace {

constexpr int SC_THREADS = FKV_SCORER_THREADS;
constexpr int SC_WARPS = SC_THREADS / 32;
constexpr int SC_CHUNK = FKV_SCORER_CHUNK;
constexpr int SC_HIDDEN = FKV_SCORER_HIDDEN;

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

template <typename T>
__device__ void scorer_impl(const fkv_scorer_params &p) {
  using E = fkv::Elem<T>;
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  const int64_t live = fkv::live_len(p.win, s);
  const int64_t hd = p.kv.head_dim, in_dim = p.in_dim, srow = p.st.group_size * FKV_NUM_STATS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T *kc = static_cast<const T *>(p.kv.key_cache);
  const T *vc = static_cast<const T *>(p.kv.value_cache);
  const float *w1 = p.w1 + kvh * SC_HIDDEN * in_dim;
  const int64_t end = min(live, (int64_t)(blockIdx.z + 1) * SC_CHUNK);
  for (int64_t i = blockIdx.z * SC_CHUNK + warp; i < end; i += SC_WARPS) {
    int64_t off;
    const int64_t b = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, i, &off);
    if (b < 0) continue;
    const T *krow = kc + fkv::key_off(p.kv, b, off, kvh);
    const T *vrow = vc + fkv::value_off(p.kv, b, off, kvh);
    const float *st = p.st.stats + fkv::stats_off(p.st, b, off, kvh);
    float acc[SC_HIDDEN];
#pragma unroll
    for (int u = 0; u < SC_HIDDEN; ++u) acc[u] = 0.f;
    for (int64_t k = lane; k < in_dim; k += 32) {
      float x;
      if (k < hd) x = E::load(krow + k);
      else if (k < 2 * hd) x = E::load(vrow + (k - hd));
      else x = (k - 2 * hd < srow) ? st[k - 2 * hd] : 0.f;
#pragma unroll
      for (int u = 0; u < SC_HIDDEN; ++u) acc[u] += w1[u * in_dim + k] * x;
    }
    float out = p.b2[kvh];
#pragma unroll
    for (int u = 0; u < SC_HIDDEN; ++u) {
      const float pre = fkv::warp_sum(acc[u]) + p.b1[kvh * SC_HIDDEN + u];
      out += p.w2[kvh * SC_HIDDEN + u] * gelu(pre);
    }
    if (lane == 0) p.scores[(s * p.kv.num_kv_heads + kvh) * p.max_live + i] = out;
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SC_THREADS) fkv_scorer_mlp(const fkv_scorer_params p) {
  fkv::with_elem(p.kv.dtype, [&](auto t) { scorer_impl<typename decltype(t)::type>(p); });
}
