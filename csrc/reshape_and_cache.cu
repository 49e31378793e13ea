// reshape_and_cache: scatter new K/V rows into the paged cache at the slots the block manager chose.
// One thread block per token; threads stride over (head, dim). Contract and CPU reference:
// src/kernels/reshape_and_cache.rs.
#include "fkv_common.cuh"

namespace {

template <typename T>
__device__ void reshape_and_cache_impl(const fkv_reshape_and_cache_params &p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  if (block >= p.num_blocks) return;  // validated on the host; never write out of bounds
  const T *key = static_cast<const T *>(p.key);
  const T *value = static_cast<const T *>(p.value);
  T *kc = static_cast<T *>(p.key_cache);
  T *vc = static_cast<T *>(p.value_cache);
  const int64_t n = p.num_kv_heads * p.head_dim;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t h = i / p.head_dim;
    const int64_t d = i % p.head_dim;
    kc[block * p.kc_stride_block + offset * p.kc_stride_token + h * p.kc_stride_head + d] =
        key[token * p.key_stride_token + h * p.key_stride_head + d];
    vc[block * p.vc_stride_block + offset * p.vc_stride_token + h * p.vc_stride_head + d] =
        value[token * p.value_stride_token + h * p.value_stride_head + d];
  }
}

}  // namespace

extern "C" __global__ void fkv_reshape_and_cache(const fkv_reshape_and_cache_params p) {
  switch (p.dtype) {
    case FKV_DTYPE_F32: reshape_and_cache_impl<float>(p); break;
    case FKV_DTYPE_F16: reshape_and_cache_impl<__half>(p); break;
    case FKV_DTYPE_BF16: reshape_and_cache_impl<__nv_bfloat16>(p); break;
    default: break;
  }
}
