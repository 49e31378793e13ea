// select_survivors: per (seq, KV head) the deterministic top-k eviction choice. A radix select
// (fkv::radix_top, 8 bits a pass, from the top) over the total-order score keys finds the
// threshold key T of the num_evict-th largest unprotected score and how many keys equal to T are
// evicted; every key above T is evicted, and of the keys equal to T the lowest slots, as many as
// needed (fkv::tie_cutoff). A block scan then writes the survivors in ascending order. Grid
// (kv_head, seq), FKV_SELECT_THREADS threads. CPU reference: src/kernels/select_survivors.rs.
#include "fkv_common.cuh"
#include "fkv_select.cuh"

extern "C" __global__ void __launch_bounds__(FKV_SELECT_THREADS) fkv_select_survivors(const fkv_select_params p) {
  const fkv::SelectRow row =
      fkv::select_row(p.win, p.scores, p.num_evict, p.survivors, p.num_kv_heads, p.max_live, p.num_protected);
  const int64_t live = row.live, cand = row.cand, k = row.evict;
  const float *scores = row.scores;

  auto key_of = [&](int64_t i, uint32_t *key) {
    *key = fkv::score_key(scores[i]);
    return true;
  };
  uint32_t thr = 0;
  int64_t cut = 0;
  if (k > 0) {
    int ties;
    fkv::radix_top<FKV_SELECT_THREADS, uint32_t>(cand, (int)k, key_of, &thr, &ties);
    cut = fkv::tie_cutoff<FKV_SELECT_THREADS, uint32_t>(cand, key_of, thr, ties);
  }
  fkv::write_survivors<FKV_SELECT_THREADS>(live, p.max_live, row.out, [&](int64_t i) {
    if (k == 0 || i >= cand) return false;
    const uint32_t key = fkv::score_key(scores[i]);
    return key > thr || (key == thr && i < cut);
  });
}
