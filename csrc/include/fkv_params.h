/* Kernel parameter structs shared by the CUDA C++ kernels and the Rust launchers.
 * This header is the one definition: build.rs runs bindgen over it, so Rust never
 * mirrors these by hand. Plain C (no C++), fixed-width fields, passed by value. */
#ifndef FKV_PARAMS_H
#define FKV_PARAMS_H

#include <stdint.h>

/* Element type of a KV tensor. */
typedef enum fkv_dtype {
  FKV_DTYPE_F32 = 0,
  FKV_DTYPE_F16 = 1,
  FKV_DTYPE_BF16 = 2
} fkv_dtype;

/* reshape_and_cache: write num_tokens new K/V rows into cache slots.
 * Token i goes to block slot_mapping[i] / block_size, offset slot_mapping[i] % block_size;
 * a negative slot (padding) is skipped. All strides are in elements; the head_dim axis is
 * contiguous in every tensor. */
typedef struct fkv_reshape_and_cache_params {
  const void *key;        /* [num_tokens, num_kv_heads, head_dim] */
  const void *value;      /* [num_tokens, num_kv_heads, head_dim] */
  void *key_cache;        /* [num_blocks, ..block/token/head strides.., head_dim] */
  void *value_cache;
  const int64_t *slot_mapping; /* [num_tokens] */
  int64_t num_tokens;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t num_blocks;
  int64_t key_stride_token;
  int64_t key_stride_head;
  int64_t value_stride_token;
  int64_t value_stride_head;
  int64_t kc_stride_block;
  int64_t kc_stride_token;
  int64_t kc_stride_head;
  int64_t vc_stride_block;
  int64_t vc_stride_token;
  int64_t vc_stride_head;
  int32_t dtype; /* fkv_dtype */
} fkv_reshape_and_cache_params;

#endif
