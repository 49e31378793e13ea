// window_stats: causal softmax of the queries since the last eviction against the live window,
// reduced per live slot and query head to the 8 ForesightKV statistics, without materialising the
// query x slot probability matrix. Three launches over tiles of WS_TILE live slots:
//   partial: per (query row, tile) max and sum of exp of the visible logits -> workspace
//   lse:     per query row, log-sum-exp over its tiles -> workspace
//   reduce:  per slot and query head, the statistics from p = exp(logit - lse), written in place:
//            the last min(n, window) rows are the statistics window, earlier rows are folded into
//            the cumulative ones; decayed = 0.9 * (old + folded) + window sum (once per interval);
//            mode 1 (official) sets sum8/16/32 to the window sum. Streaming fold: with folded[s] > 0
//            the running fold kept in the sum column is continued for slots before the rows;
//            fold_only calls fold every row and write only that running fold.
// Contract and CPU reference: src/kernels/window_stats.rs.
#include "fkv_common.cuh"

namespace {

constexpr int WS_TILE = FKV_WINDOW_STATS_TILE;  // slots per tile: one per lane
constexpr int WS_THREADS = FKV_WINDOW_STATS_THREADS;
constexpr int WS_WARPS = WS_THREADS / 32;
constexpr float WS_DECAY = 0.9f;

// Loads the key rows of one tile into shared memory (rows padded by one float: conflict-free
// per-lane dot products); valid[t] says whether slot t exists and its block is in range.
template <typename T, int HD>
__device__ void load_key_tile(const fkv_window_stats_params &p, int64_t s, int64_t kvh, int64_t start,
                              int64_t live, float (*ks)[HD + 1], int *valid) {
  const T *kc = static_cast<const T *>(p.kv.key_cache);
  for (int t = threadIdx.x; t < WS_TILE; t += WS_THREADS) {
    int ok = 0;
    if (start + t < live) {
      int64_t off;
      ok = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, start + t, &off) >= 0;
    }
    valid[t] = ok;
  }
  for (int idx = threadIdx.x; idx < WS_TILE * HD; idx += WS_THREADS) {
    const int t = idx / HD, d = idx % HD;
    float v = 0.f;
    if (start + t < live) {
      int64_t off;
      const int64_t b = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, start + t, &off);
      if (b >= 0) v = fkv::Elem<T>::load(kc + fkv::key_off(p.kv, b, off, kvh) + d);
    }
    ks[t][d] = v;
  }
  __syncthreads();
}

// Lane t's scaled logit of slot t of the tile against the query row in q (shared, HD floats).
template <int HD>
__device__ __forceinline__ float tile_logit(const float (*ks)[HD + 1], const float *q, int lane, float scale) {
  float acc = 0.f;
#pragma unroll 8
  for (int d = 0; d < HD; ++d) acc += q[d] * ks[lane][d];
  return acc * scale;
}

template <typename T>
__device__ __forceinline__ void load_query(const fkv_window_stats_params &p, int64_t s, int64_t j, int64_t h,
                                           int hd, int lane, float *q) {
  const T *qp = static_cast<const T *>(p.queries) + s * p.q_stride_seq + j * p.q_stride_query + h * p.q_stride_head;
  for (int d = lane; d < hd; d += 32) q[d] = fkv::Elem<T>::load(qp + d);
  __syncwarp();
}

// Shared memory of the partial and reduce passes, sized for the largest head dim (256).
struct WsShared {
  float ks[WS_TILE * (256 + 1)];
  float qs[WS_WARPS * 256];
  int valid[WS_TILE];
};

// The block of the partial and reduce passes: grid (KV head, sequence, tile), n query rows since
// the last eviction against live slots [start, start + WS_TILE), the first `base` slots older than
// every row; the tile's keys (ks, valid) and each warp's query row (qs) in shared memory.
template <int HD>
struct WsTile {
  int64_t kvh, s, tile, n, live, start, G, base;
  int lane, warp;
  const float (*ks)[HD + 1];
  float (*qs)[HD];
  const int *valid;
};

// This block's tile, its key rows loaded into shared memory; false (block-uniform, before any
// barrier) when the block has no rows or no slots.
template <typename T, int HD>
__device__ __forceinline__ bool ws_tile(const fkv_window_stats_params &p, WsShared &sh, WsTile<HD> &t) {
  t.kvh = blockIdx.x;
  t.s = blockIdx.y;
  t.tile = blockIdx.z;
  t.n = p.num_queries[t.s];
  t.live = fkv::live_len(p.win, t.s);
  t.start = t.tile * WS_TILE;
  if (t.n <= 0 || t.n > t.live || t.start >= t.live) return false;
  load_key_tile<T, HD>(p, t.s, t.kvh, t.start, t.live, reinterpret_cast<float (*)[HD + 1]>(sh.ks), sh.valid);
  t.lane = threadIdx.x & 31;
  t.warp = threadIdx.x >> 5;
  t.G = p.num_q_heads / p.kv.num_kv_heads;
  t.base = t.live - t.n;
  t.ks = reinterpret_cast<const float (*)[HD + 1]>(sh.ks);
  t.qs = reinterpret_cast<float (*)[HD]>(sh.qs);
  t.valid = sh.valid;
  return true;
}

template <typename T, int HD>
__device__ void ws_partial(const fkv_window_stats_params &p, WsShared &sh) {
  WsTile<HD> t;
  if (!ws_tile<T, HD>(p, sh, t)) return;
  const auto [kvh, s, tile, n, live, start, G, base, lane, warp, ks, qs, valid] = t;
  for (int64_t r = warp; r < n * G; r += WS_WARPS) {
    const int64_t j = r / G, h = kvh * G + r % G;
    load_query<T>(p, s, j, h, HD, lane, qs[warp]);
    const int64_t slot = start + lane;
    const bool vis = valid[lane] && slot <= base + j;
    const float x = tile_logit<HD>(ks, qs[warp], lane, p.scale);
    const float m = fkv::warp_max(vis ? x : -INFINITY);
    const float l = fkv::warp_sum(vis ? expf(x - m) : 0.f);
    if (lane == 0) {
      const int64_t row = (s * p.num_q_heads + h) * p.max_queries + j;
      p.workspace[row * p.num_tiles + tile] = m;
      p.workspace[(p.win.num_seqs * p.num_q_heads * p.max_queries + row) * p.num_tiles + tile] = l;
    }
    __syncwarp();
  }
}

// Grid (seq), threads over (query head, row): lse of each row over the tiles of its sequence.
__device__ void ws_lse(const fkv_window_stats_params &p) {
  const int64_t s = blockIdx.x;
  const int64_t n = p.num_queries[s], live = fkv::live_len(p.win, s);
  if (n <= 0 || n > live) return;
  const int64_t tiles = (live + WS_TILE - 1) / WS_TILE;
  const int64_t rows_total = p.win.num_seqs * p.num_q_heads * p.max_queries;
  float *lse = p.workspace + 2 * rows_total * p.num_tiles;
  for (int64_t r = threadIdx.x; r < p.num_q_heads * n; r += blockDim.x) {
    const int64_t h = r / n, j = r % n;
    const int64_t row = (s * p.num_q_heads + h) * p.max_queries + j;
    const float *ms = p.workspace + row * p.num_tiles;
    const float *ls = p.workspace + (rows_total + row) * p.num_tiles;
    float m = -INFINITY;
    for (int64_t t = 0; t < tiles; ++t)
      if (ls[t] > 0.f) m = fmaxf(m, ms[t]);
    float l = 0.f;
    for (int64_t t = 0; t < tiles; ++t)
      if (ls[t] > 0.f) l += ls[t] * expf(ms[t] - m);
    lse[row] = l > 0.f ? m + logf(l) : INFINITY;
  }
}

template <typename T, int HD>
__device__ void ws_reduce(const fkv_window_stats_params &p, WsShared &sh) {
  WsTile<HD> t;
  if (!ws_tile<T, HD>(p, sh, t)) return;
  const auto [kvh, s, tile, n, live, start, G, base, lane, warp, ks, qs, valid] = t;
  const int64_t rows_total = p.win.num_seqs * p.num_q_heads * p.max_queries;
  const float *lse = p.workspace + 2 * rows_total * p.num_tiles;
  const int64_t slot = start + lane;
  const int64_t w = p.fold_only ? 0 : ((p.window > 0 && p.window < n) ? p.window : n);
  const int64_t first_window = n - w;  // rows before it are folded into the cumulative statistics
  const int64_t before = p.folded ? p.folded[s] : 0;  // rows earlier fold-only calls took
  float *row = nullptr;
  if (valid[lane]) {
    int64_t off;
    const int64_t b = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, slot, &off);
    row = p.st.stats + fkv::stats_off(p.st, b, off, kvh);
  }
  for (int64_t g = warp; g < G; g += WS_WARPS) {
    const int64_t h = kvh * G + g;
    float mx = -INFINITY, mn = INFINITY, sum = 0.f, s8 = 0.f, s16 = 0.f, s32 = 0.f;
    float fold = (row && before > 0 && slot < base) ? row[g * 8 + 2] : 0.f;
    for (int64_t j = 0; j < n; ++j) {
      load_query<T>(p, s, j, h, HD, lane, qs[warp]);
      const bool vis = valid[lane] && slot <= base + j;
      const float x = tile_logit<HD>(ks, qs[warp], lane, p.scale);
      const float pr = vis ? expf(x - lse[(s * p.num_q_heads + h) * p.max_queries + j]) : 0.f;
      if (j < first_window) {
        fold += pr;
      } else {
        if (vis) {
          mx = fmaxf(mx, pr);
          mn = fminf(mn, pr);
        }
        sum += pr;
        if (j + 8 >= n) s8 += pr;
        if (j + 16 >= n) s16 += pr;
        if (j + 32 >= n) s32 += pr;
      }
      __syncwarp();
    }
    if (p.mode == 1) s8 = s16 = s32 = sum;
    if (row && p.fold_only) {
      row[g * 8 + 2] = fold;
    } else if (row) {
      float *r = row + g * 8;
      float old_cum = 0.f, old_dec = 0.f;
      if (slot + before < base) {
        old_cum = r[6];
        old_dec = r[7];
      }
      r[0] = mx;
      r[1] = mn;
      r[2] = sum;
      r[3] = s8;
      r[4] = s16;
      r[5] = s32;
      r[6] = old_cum + fold + sum;
      r[7] = WS_DECAY * (old_dec + fold) + sum;
    }
  }
}

template <typename T>
__device__ void ws_dispatch(const fkv_window_stats_params &p, int pass, WsShared &sh) {
  switch (p.kv.head_dim) {
    case FKV_HEAD_DIM_SMALL: pass == 0 ? ws_partial<T, FKV_HEAD_DIM_SMALL>(p, sh) : ws_reduce<T, FKV_HEAD_DIM_SMALL>(p, sh); break;
    case FKV_HEAD_DIM_MEDIUM: pass == 0 ? ws_partial<T, FKV_HEAD_DIM_MEDIUM>(p, sh) : ws_reduce<T, FKV_HEAD_DIM_MEDIUM>(p, sh); break;
    case FKV_HEAD_DIM_LARGE: pass == 0 ? ws_partial<T, FKV_HEAD_DIM_LARGE>(p, sh) : ws_reduce<T, FKV_HEAD_DIM_LARGE>(p, sh); break;
    default: break;
  }
}

__device__ void ws_entry(const fkv_window_stats_params &p, int pass) {
  __shared__ WsShared sh;
  switch (p.kv.dtype) {
    case FKV_DTYPE_F32: ws_dispatch<float>(p, pass, sh); break;
    case FKV_DTYPE_F16: ws_dispatch<__half>(p, pass, sh); break;
    case FKV_DTYPE_BF16: ws_dispatch<__nv_bfloat16>(p, pass, sh); break;
    default: break;
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(WS_THREADS) fkv_window_stats_partial(const fkv_window_stats_params p) {
  ws_entry(p, 0);
}

extern "C" __global__ void fkv_window_stats_lse(const fkv_window_stats_params p) { ws_lse(p); }

extern "C" __global__ void __launch_bounds__(WS_THREADS) fkv_window_stats_reduce(const fkv_window_stats_params p) {
  ws_entry(p, 1);
}
