// select_survivors: per (seq, KV head) the deterministic top-k eviction choice. A 4-pass radix
// select (8 bits a pass, from the top) over the total-order score keys finds the threshold key T
// of the num_evict-th largest unprotected score; every key above T is evicted, and of the keys
// equal to T the lowest slots, as many as still needed. Two block scans then write the survivors
// in ascending order. Grid (kv_head, seq), SEL_THREADS threads. CPU reference:
// src/kernels/select.rs.
#include "fkv_common.cuh"

namespace {

constexpr int SEL_THREADS = 256;
constexpr int SEL_WARPS = SEL_THREADS / 32;

// Exclusive prefix sum of v over the block; *total receives the block sum. All threads call it.
__device__ int block_exclusive_scan(int v, int *total) {
  __shared__ int warp_sums[SEL_WARPS];
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
    for (int w = 0; w < SEL_WARPS; ++w) {
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

}  // namespace

extern "C" __global__ void __launch_bounds__(SEL_THREADS) fkv_select_survivors(const fkv_select_params p) {
  __shared__ unsigned int hist[256];
  __shared__ uint32_t prefix_s, mask_s;
  __shared__ int remaining_s;
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  const int64_t live = fkv::live_len(p.win, s);
  int64_t cand = live - p.num_protected;
  if (cand < 0) cand = 0;
  int64_t k = p.num_evict[s];
  if (k < 0) k = 0;
  if (k > cand) k = cand;
  const float *scores = p.scores + (s * p.num_kv_heads + kvh) * p.max_live;
  int32_t *out = p.survivors + (s * p.num_kv_heads + kvh) * p.max_live;

  if (threadIdx.x == 0) {
    prefix_s = 0;
    mask_s = 0;
    remaining_s = (int)k;
  }
  __syncthreads();
  if (k > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int d = threadIdx.x; d < 256; d += SEL_THREADS) hist[d] = 0;
      __syncthreads();
      const uint32_t prefix = prefix_s, mask = mask_s;
      for (int64_t i = threadIdx.x; i < cand; i += SEL_THREADS) {
        const uint32_t key = fkv::score_key(scores[i]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
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
        prefix_s = prefix | ((uint32_t)d << shift);
        mask_s = mask | (255u << shift);
      }
      __syncthreads();
    }
  }
  const uint32_t thr = prefix_s;
  const int ties_to_evict = k > 0 ? remaining_s : 0;
  int tie_base = 0, keep_base = 0;
  for (int64_t c0 = 0; c0 < live; c0 += SEL_THREADS) {
    const int64_t i = c0 + threadIdx.x;
    int tie = 0, greater = 0;
    if (k > 0 && i < cand) {
      const uint32_t key = fkv::score_key(scores[i]);
      greater = key > thr;
      tie = key == thr;
    }
    int tie_total, keep_total;
    const int tie_rank = tie_base + block_exclusive_scan(tie, &tie_total);
    const int evicted = greater || (tie && tie_rank < ties_to_evict);
    const int keep = (i < live) && !evicted;
    const int pos = keep_base + block_exclusive_scan(keep, &keep_total);
    if (keep && pos < p.max_live) out[pos] = (int32_t)i;
    tie_base += tie_total;
    keep_base += keep_total;
  }
}
