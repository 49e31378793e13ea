// compact: per (seq, KV head) move the survivors' K, V and statistics rows to the tail of the live
// window in their original order, in place. Survivor k (ascending slot s_k) goes to slot
// num_evict + k >= s_k, so processing chunks of survivors from the highest down, each chunk read
// whole into shared memory before any of it is written, never overwrites a row still to be read.
// Grid (kv_head, seq), CP_THREADS threads. CPU reference: src/kernels/compact.rs.
#include "fkv_common.cuh"

namespace {

constexpr int CP_THREADS = FKV_COMPACT_THREADS;
constexpr int CP_STAGE = FKV_COMPACT_STAGE;  // floats staged per chunk (32 KiB)
constexpr int CP_MAX_ROWS = 64;

// Shared memory of one block, declared once in the entry point.
struct CpShared {
  float stage[CP_STAGE];
  int64_t src_off[CP_MAX_ROWS][3];
  int64_t dst_off[CP_MAX_ROWS][3];
  int move[CP_MAX_ROWS];
};

template <typename T>
__device__ void compact_impl(const fkv_compact_params &p, CpShared &sh) {
  using E = fkv::Elem<T>;
  float *stage = sh.stage;
  auto src_off = sh.src_off;
  auto dst_off = sh.dst_off;
  int *move = sh.move;
  const int64_t kvh = blockIdx.x, s = blockIdx.y;
  const int64_t live = fkv::live_len(p.win, s);
  const int64_t evict = p.num_evict[s];
  if (evict < 0 || evict > live) return;
  const int64_t keep = live - evict;
  const int64_t hd = p.kv.head_dim;
  const int64_t srow = p.st.stats ? p.st.group_size * FKV_NUM_STATS : 0;
  const int64_t rw = 2 * hd + srow;
  int64_t rows = CP_STAGE / rw;
  if (rows > CP_MAX_ROWS) rows = CP_MAX_ROWS;
  if (rows < 1) return;  // rejected on the host: a row larger than the staging buffer
  const int32_t *surv = p.survivors + (s * p.kv.num_kv_heads + kvh) * p.max_live;
  T *kc = static_cast<T *>(p.kv.key_cache);
  T *vc = static_cast<T *>(p.kv.value_cache);
  for (int64_t hi = keep; hi > 0; hi -= rows) {
    const int64_t lo = hi > rows ? hi - rows : 0;
    for (int64_t r = threadIdx.x; r < hi - lo; r += CP_THREADS) {
      const int64_t k = lo + r;
      const int64_t src = surv[k], dst = evict + k;
      int ok = src >= 0 && src < live && src != dst;
      if (ok) {
        int64_t so, dof;
        const int64_t sb = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, src, &so);
        const int64_t db = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, dst, &dof);
        ok = sb >= 0 && db >= 0;
        if (ok) {
          src_off[r][0] = fkv::key_off(p.kv, sb, so, kvh);
          src_off[r][1] = fkv::value_off(p.kv, sb, so, kvh);
          src_off[r][2] = srow ? fkv::stats_off(p.st, sb, so, kvh) : 0;
          dst_off[r][0] = fkv::key_off(p.kv, db, dof, kvh);
          dst_off[r][1] = fkv::value_off(p.kv, db, dof, kvh);
          dst_off[r][2] = srow ? fkv::stats_off(p.st, db, dof, kvh) : 0;
        }
      }
      move[r] = ok;
    }
    __syncthreads();
    const int64_t n = (hi - lo) * rw;
    for (int64_t idx = threadIdx.x; idx < n; idx += CP_THREADS) {
      const int64_t r = idx / rw, c = idx % rw;
      if (!move[r]) continue;
      float v;
      if (c < hd) v = E::load(kc + src_off[r][0] + c);
      else if (c < 2 * hd) v = E::load(vc + src_off[r][1] + (c - hd));
      else v = p.st.stats[src_off[r][2] + (c - 2 * hd)];
      stage[idx] = v;
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < n; idx += CP_THREADS) {
      const int64_t r = idx / rw, c = idx % rw;
      if (!move[r]) continue;
      const float v = stage[idx];
      if (c < hd) E::store(kc + dst_off[r][0] + c, v);
      else if (c < 2 * hd) E::store(vc + dst_off[r][1] + (c - hd), v);
      else p.st.stats[dst_off[r][2] + (c - 2 * hd)] = v;
    }
    __syncthreads();
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(CP_THREADS) fkv_compact(const fkv_compact_params p) {
  __shared__ CpShared sh;
  fkv::with_elem(p.kv.dtype, [&](auto t) { compact_impl<typename decltype(t)::type>(p, sh); });
}
