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
  const fkv_paged_kv &kv = p.kv;
  const int64_t block = slot / kv.block_size;
  const int64_t offset = slot % kv.block_size;
  if (block >= kv.num_blocks) return;  // validated on the host; never write out of bounds
  const T *key = static_cast<const T *>(p.key);
  const T *value = static_cast<const T *>(p.value);
  T *kc = static_cast<T *>(kv.key_cache);
  T *vc = static_cast<T *>(kv.value_cache);
  const int64_t n = kv.num_kv_heads * kv.head_dim;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t h = i / kv.head_dim;
    const int64_t d = i % kv.head_dim;
    kc[fkv::key_off(kv, block, offset, h) + d] = key[token * p.key_stride_token + h * p.key_stride_head + d];
    vc[fkv::value_off(kv, block, offset, h) + d] = value[token * p.value_stride_token + h * p.value_stride_head + d];
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(FKV_RESHAPE_THREADS_MAX) fkv_reshape_and_cache(const fkv_reshape_and_cache_params p) {
  fkv::with_elem(p.kv.dtype, [&](auto t) { reshape_and_cache_impl<typename decltype(t)::type>(p); });
}
