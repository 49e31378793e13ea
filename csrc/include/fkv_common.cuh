// Device helpers shared by the kernels: element loads/stores through fp32 for every fkv_dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "fkv_params.h"

namespace fkv {

// A type as a value, for the generic lambdas the dispatchers below call.
template <typename T> struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the element type of fkv_dtype `dtype` (nothing for an unknown code,
// which the host validation rules out): the one dtype switch of the kernels.
template <typename F> __device__ __forceinline__ void with_elem(int32_t dtype, F f) {
  switch (dtype) {
    case FKV_DTYPE_F32: f(Tag<float>{}); break;
    case FKV_DTYPE_F16: f(Tag<__half>{}); break;
    case FKV_DTYPE_BF16: f(Tag<__nv_bfloat16>{}); break;
    default: break;
  }
}

// Calls f(std::integral_constant<int, HD>{}) with HD the supported head dim `head_dim` (nothing for
// another one, which the host validation rules out): the one head-dim switch of the kernels.
template <typename F> __device__ __forceinline__ void with_head_dim(int64_t head_dim, F f) {
  switch (head_dim) {
    case FKV_HEAD_DIM_SMALL: f(std::integral_constant<int, FKV_HEAD_DIM_SMALL>{}); break;
    case FKV_HEAD_DIM_MEDIUM: f(std::integral_constant<int, FKV_HEAD_DIM_MEDIUM>{}); break;
    case FKV_HEAD_DIM_LARGE: f(std::integral_constant<int, FKV_HEAD_DIM_LARGE>{}); break;
    default: break;
  }
}

template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float load(const float *p) { return *p; }
  static __device__ __forceinline__ void store(float *p, float v) { *p = v; }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half *p, float v) { *p = __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Live length of sequence s (0 when the window is malformed).
__device__ __forceinline__ int64_t live_len(const fkv_live_windows &w, int64_t s) {
  const int64_t n = (int64_t)w.seq_lens[s] - (int64_t)w.live_starts[s];
  return n > 0 ? n : 0;
}

// Block id holding live slot i of sequence s and the offset in it; -1 when the table entry is
// outside the cache (rows of such slots are neither read nor written).
__device__ __forceinline__ int64_t live_block(const fkv_live_windows &w, int64_t num_blocks,
                                              int64_t block_size, int64_t s, int64_t i,
                                              int64_t *offset) {
  const int64_t pos = (int64_t)w.live_starts[s] + i;
  const int32_t b = w.block_tables[s * w.block_table_stride + pos / block_size];
  *offset = pos % block_size;
  return (b >= 0 && (int64_t)b < num_blocks) ? (int64_t)b : -1;
}

__device__ __forceinline__ int64_t key_off(const fkv_paged_kv &kv, int64_t b, int64_t t, int64_t h) {
  return b * kv.k_stride_block + t * kv.k_stride_token + h * kv.k_stride_head;
}

__device__ __forceinline__ int64_t value_off(const fkv_paged_kv &kv, int64_t b, int64_t t, int64_t h) {
  return b * kv.v_stride_block + t * kv.v_stride_token + h * kv.v_stride_head;
}

__device__ __forceinline__ int64_t stats_off(const fkv_stats_buf &st, int64_t b, int64_t t, int64_t h) {
  return b * st.stride_block + t * st.stride_token + h * st.stride_head;
}

// Total-order key of an f32 score (same as kernels::score_key on the CPU).
__device__ __forceinline__ uint32_t score_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace fkv
