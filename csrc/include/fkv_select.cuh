// Block-wide radix select and scans shared by select_survivors.cu and sample_survivors.cu: the one
// definition of how a (sequence, KV head) block finds the k largest keys of its live slots (ties:
// the lower slots) and writes the survivors in ascending order. Every function is called by all
// THREADS threads of the block and returns the same result to each.
#pragma once
#include <stdint.h>

#include "fkv_common.cuh"

namespace fkv {

// The row the (kv head blockIdx.x, sequence blockIdx.y) block selects on: live slots, unprotected
// candidates [0, cand), victims to choose (num_evict[s] clamped to [0, cand]), and the block's
// rows of the [num_seqs, num_kv_heads, max_live] score and survivor matrices.
struct SelectRow {
  int64_t live, cand, evict;
  const float *scores;
  int32_t *out;
};

__device__ __forceinline__ SelectRow select_row(const fkv_live_windows &win, const float *scores,
                                                const int32_t *num_evict, int32_t *survivors,
                                                int64_t num_kv_heads, int64_t max_live,
                                                int64_t num_protected) {
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  SelectRow r;
  r.live = live_len(win, s);
  r.cand = r.live - num_protected > 0 ? r.live - num_protected : 0;
  const int64_t k = num_evict[s];
  r.evict = k < 0 ? 0 : (k > r.cand ? r.cand : k);
  r.scores = scores + (s * num_kv_heads + kvh) * max_live;
  r.out = survivors + (s * num_kv_heads + kvh) * max_live;
  return r;
}

// Exclusive prefix sum of v over the block; *total receives the block sum.
template <int THREADS>
__device__ int block_scan(int v, int *total) {
  __shared__ int warp_sums[THREADS / 32];
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
    for (int w = 0; w < THREADS / 32; ++w) {
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
// at most the number of such slots), by a radix select of 8 bits a pass from the top: *thr = the
// k-th largest key, *ties = how many keys equal to it belong to the k.
template <int THREADS, typename K, typename KeyOf>
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
    for (int d = threadIdx.x; d < 256; d += THREADS) hist[d] = 0;
    __syncthreads();
    const K prefix = prefix_s, mask = mask_s;
    for (int64_t i = threadIdx.x; i < n; i += THREADS) {
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
// them (0 when ties is 0).
template <int THREADS, typename K, typename KeyOf>
__device__ int64_t tie_cutoff(int64_t n, KeyOf key_of, K thr, int ties) {
  __shared__ long long cut_s;
  if (threadIdx.x == 0) cut_s = 0;
  __syncthreads();
  int base = 0;
  for (int64_t c0 = 0; c0 < n && base < ties; c0 += THREADS) {
    const int64_t i = c0 + threadIdx.x;
    K key;
    const int tie = (i < n && key_of(i, &key) && key == thr) ? 1 : 0;
    int total;
    const int rank = base + block_scan<THREADS>(tie, &total);
    if (tie && rank == ties - 1) cut_s = i + 1;
    base += total;
  }
  __syncthreads();
  const int64_t cut = cut_s;
  __syncthreads();
  return cut;
}

// Writes the slots i in [0, live) that are not victims, ascending, to out[0 ..] (at most max_live).
template <int THREADS, typename IsVictim>
__device__ void write_survivors(int64_t live, int64_t max_live, int32_t *out, IsVictim is_victim) {
  int keep_base = 0;
  for (int64_t c0 = 0; c0 < live; c0 += THREADS) {
    const int64_t i = c0 + threadIdx.x;
    const int keep = (i < live) && !is_victim(i);
    int keep_total;
    const int pos = keep_base + block_scan<THREADS>(keep, &keep_total);
    if (keep && pos < max_live) out[pos] = (int32_t)i;
    keep_base += keep_total;
  }
}

}  // namespace fkv
