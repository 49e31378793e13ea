/* Kernel parameter structs shared by the CUDA C++ kernels and the Rust launchers.
 * This header is the one definition: build.rs runs bindgen over it, so Rust never
 * mirrors these by hand. Plain C (no C++), fixed-width fields, passed by value. */
#ifndef FKV_PARAMS_H
#define FKV_PARAMS_H

#include <stdint.h>

/* Kernel constants: the one definition, read by nvcc (the kernels) and by bindgen (the Rust
 * launchers and CPU references, as crate::cuda::params::FKV_*). */

/* Head dims the attention and eviction kernels are instantiated for (decode, window_stats,
 * scorer_mlp, compact). */
#define FKV_HEAD_DIM_SMALL 64
#define FKV_HEAD_DIM_MEDIUM 128
#define FKV_HEAD_DIM_LARGE 256
/* ForesightKV statistics per (live entry, query head), and the scorer MLP's hidden width. */
#define FKV_NUM_STATS 8
#define FKV_SCORER_HIDDEN 16
/* Largest grid y / z dimension of a launch (sequences, partitions, tiles, chunks). */
#define FKV_MAX_GRID_YZ 65535
/* reshape_and_cache: at most this many threads per token (one block per token). */
#define FKV_RESHAPE_THREADS_MAX 512
/* paged_attention_decode: threads per block, query heads the P.V phase accumulates together, and
 * the dynamic shared memory a block may use without opting in to more. */
#define FKV_DECODE_THREADS 128
#define FKV_DECODE_GCHUNK 8
#define FKV_DECODE_SHARED_LIMIT 49152
/* window_stats: live slots per tile (one per lane), threads of the tile kernels and of lse. */
#define FKV_WINDOW_STATS_TILE 32
#define FKV_WINDOW_STATS_THREADS 128
#define FKV_WINDOW_STATS_LSE_THREADS 256
/* scorer_mlp: threads per block and live slots per block. */
#define FKV_SCORER_THREADS 128
#define FKV_SCORER_CHUNK 32
/* select_survivors and sample_survivors: threads per block (one block per sequence and KV head). */
#define FKV_SELECT_THREADS 256
#define FKV_SAMPLE_THREADS 256
/* compact: threads per block, and floats one block stages per chunk (32 KiB). */
#define FKV_COMPACT_THREADS 256
#define FKV_COMPACT_STAGE 8192

/* Element type of a KV tensor. */
typedef enum fkv_dtype {
  FKV_DTYPE_F32 = 0,
  FKV_DTYPE_F16 = 1,
  FKV_DTYPE_BF16 = 2
} fkv_dtype;

/* A paged K/V cache (written by reshape_and_cache, read by decode, window_stats and scorer_mlp,
 * rewritten by compact).
 * Row (block, token, head) of the keys starts at key_cache + block * k_stride_block +
 * token * k_stride_token + head * k_stride_head (elements of dtype); head_dim contiguous.
 * key_cache and value_cache may point into one fused tensor. */
typedef struct fkv_paged_kv {
  void *key_cache;
  void *value_cache;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t k_stride_block;
  int64_t k_stride_token;
  int64_t k_stride_head;
  int64_t v_stride_block;
  int64_t v_stride_token;
  int64_t v_stride_head;
  int32_t dtype; /* fkv_dtype */
} fkv_paged_kv;

/* reshape_and_cache: write num_tokens new K/V rows into cache slots of kv.
 * Token i goes to block slot_mapping[i] / kv.block_size, offset slot_mapping[i] % kv.block_size;
 * a negative slot (padding) or one past the cache is skipped. All strides are in elements; the
 * head_dim axis is contiguous in every tensor. */
typedef struct fkv_reshape_and_cache_params {
  fkv_paged_kv kv;
  const void *key;             /* [num_tokens, kv.num_kv_heads, kv.head_dim] */
  const void *value;           /* [num_tokens, kv.num_kv_heads, kv.head_dim] */
  const int64_t *slot_mapping; /* [num_tokens] */
  int64_t num_tokens;
  int64_t key_stride_token;
  int64_t key_stride_head;
  int64_t value_stride_token;
  int64_t value_stride_head;
} fkv_reshape_and_cache_params;

/* Live windows of a batch: live slot i of sequence s is logical position live_starts[s] + i, in
 * block block_tables[s * block_table_stride + pos / block_size] at offset pos % block_size.
 * Block ids outside [0, num_blocks) are skipped on the device (validated on the host first). */
typedef struct fkv_live_windows {
  const int32_t *block_tables;
  const int32_t *seq_lens;
  const int32_t *live_starts;
  int64_t block_table_stride;
  int64_t num_seqs;
} fkv_live_windows;

/* A paged f32 statistics buffer: row (block, token, head) of group_size * 8 floats. */
typedef struct fkv_stats_buf {
  float *stats;
  int64_t stride_block;
  int64_t stride_token;
  int64_t stride_head;
  int64_t group_size;
} fkv_stats_buf;

/* paged_attention_decode: one query per sequence against its live window. Grid (kv_head, seq,
 * partition); partition p covers live slots [p * partition_size, (p + 1) * partition_size).
 * With num_partitions > 1 the partitions write (max, sum, normalised output) to the workspace and
 * fkv_paged_attention_decode_merge combines them with a log-sum-exp merge. */
typedef struct fkv_decode_params {
  fkv_paged_kv kv;
  fkv_live_windows win;
  const void *query; /* [num_seqs, num_q_heads, head_dim] */
  void *out;         /* [num_seqs, num_q_heads, head_dim] */
  float *workspace;  /* num_seqs * num_q_heads * num_partitions * (head_dim + 2) floats */
  int64_t q_stride_seq;
  int64_t q_stride_head;
  int64_t o_stride_seq;
  int64_t o_stride_head;
  int64_t num_q_heads;
  int64_t partition_size;
  int64_t num_partitions;
  float scale;
} fkv_decode_params;

/* window_stats: three passes over tiles of window_tile live slots (grid (kv_head, seq, tile)):
 * partial (per tile max and sum of exp of each query row), lse (merge of the tiles per row), reduce
 * (probabilities, 8 statistics per slot and query head). */
typedef struct fkv_window_stats_params {
  fkv_paged_kv kv;
  fkv_live_windows win;
  fkv_stats_buf st;
  const void *queries;        /* [num_seqs, max_queries, num_q_heads, head_dim] */
  const int32_t *num_queries; /* [num_seqs] */
  float *workspace; /* num_seqs * num_q_heads * max_queries * (2 * num_tiles + 1) floats */
  int64_t q_stride_seq;
  int64_t q_stride_query;
  int64_t q_stride_head;
  int64_t num_q_heads;
  int64_t max_queries;
  int64_t num_tiles;
  int64_t window; /* rows of the statistics window (last min(n, window) rows; 0 = all), earlier rows folded */
  int64_t mode;   /* statistics definition: 0 paper (sum8/16/32 over the last rows), 1 official (= sum) */
  const int32_t *folded; /* [num_seqs] rows earlier fold-only calls took since the last eviction, or NULL */
  int64_t fold_only;     /* 1: every row folded, only the running fold (sum column) written */
  float scale;
} fkv_window_stats_params;

/* scorer_mlp: per (seq, kv head, slot) MLP concat(k, v, stats) -> 16 -> GELU -> 1.
 * Weights f32: w1 [num_kv_heads, 16, in_dim], b1 [num_kv_heads, 16], w2 [num_kv_heads, 16],
 * b2 [num_kv_heads]; scores [num_seqs, num_kv_heads, max_live]. */
typedef struct fkv_scorer_params {
  fkv_paged_kv kv;
  fkv_live_windows win;
  fkv_stats_buf st;
  const float *w1;
  const float *b1;
  const float *w2;
  const float *b2;
  float *scores;
  int64_t max_live;
  int64_t in_dim;
} fkv_scorer_params;

/* select_survivors: per (seq, kv head) evict the num_evict[s] highest scores among slots
 * [0, live - num_protected) (ties: lower slot first); survivors ascending to
 * survivors[(s * num_kv_heads + h) * max_live ..]. */
typedef struct fkv_select_params {
  fkv_live_windows win;
  const float *scores;
  const int32_t *num_evict;
  int32_t *survivors;
  int64_t num_kv_heads;
  int64_t max_live;
  int64_t num_protected;
} fkv_select_params;

/* sample_survivors: per (seq, kv head) the candidates are the top min(2 n, live - num_protected)
 * scores among slots [0, live - num_protected) (ties: lower slot), n = num_evict[s]; each gets
 * the binary64 key score / temperature + Gumbel(Philox4x32-10, counter [slot, evictions[s],
 * layer << 16 | head, requests[s]], key [seed lo, seed hi]); the n largest keys (ties: lower slot)
 * are evicted; survivors ascending to survivors[(s * num_kv_heads + h) * max_live ..]. */
typedef struct fkv_sample_params {
  fkv_live_windows win;
  const float *scores;
  const int32_t *num_evict;
  const uint32_t *requests;  /* [num_seqs] */
  const uint32_t *evictions; /* [num_seqs] */
  int32_t *survivors;
  int64_t num_kv_heads;
  int64_t max_live;
  int64_t num_protected;
  uint64_t seed;
  uint32_t layer; /* < 65536 */
  float temperature;
} fkv_sample_params;

/* compact: per (seq, kv head) move the live - num_evict[s] survivors (ascending live slots) to
 * live slots [num_evict[s], live), K, V and (when st.stats is not null) statistics, in place. */
typedef struct fkv_compact_params {
  fkv_paged_kv kv;
  fkv_live_windows win;
  fkv_stats_buf st;
  const int32_t *survivors;
  const int32_t *num_evict;
  int64_t max_live;
} fkv_compact_params;

#endif
