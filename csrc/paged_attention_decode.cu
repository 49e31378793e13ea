// paged_attention_decode: one query per sequence against its live window, GQA (the G query heads of
// a KV head share every K/V row load), f32 accumulation, split-KV with a log-sum-exp merge.
// Grid (kv_head, seq, partition), 128 threads. Contract and CPU reference: src/kernels/paged_attention_decode.rs.
#include "fkv_common.cuh"

namespace {

constexpr int DEC_THREADS = FKV_DECODE_THREADS;
constexpr int DEC_WARPS = DEC_THREADS / 32;
constexpr int DEC_GCHUNK = FKV_DECODE_GCHUNK;  // query heads accumulated together in the P.V phase

template <typename T, int HD>
__device__ void decode_partition(const fkv_decode_params &p) {
  using E = fkv::Elem<T>;
  extern __shared__ float smem[];
  const int64_t kvh = blockIdx.x, s = blockIdx.y, part = blockIdx.z;
  const int64_t G = p.num_q_heads / p.kv.num_kv_heads;
  const int64_t P = p.partition_size;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float *q_s = smem;              // [G][HD]
  float *logits = q_s + G * HD;   // [G][P]
  float *m_s = logits + G * P;    // [G]
  float *l_s = m_s + G;           // [G]
  float *red = l_s + G;           // [DEC_GCHUNK][HD]

  const int64_t live = fkv::live_len(p.win, s);
  const int64_t start = part * P;
  const int64_t n = live - start < P ? (live - start > 0 ? live - start : 0) : P;

  const T *query = static_cast<const T *>(p.query);
  for (int64_t idx = tid; idx < G * HD; idx += DEC_THREADS) {
    const int64_t g = idx / HD, d = idx % HD;
    q_s[idx] = E::load(query + s * p.q_stride_seq + (kvh * G + g) * p.q_stride_head + d);
  }
  __syncthreads();

  // Q.K: one warp per slot, lanes split head_dim; the K row is loaded once for all G heads.
  const T *kc = static_cast<const T *>(p.kv.key_cache);
  constexpr int PL = HD / 32;
  for (int64_t t = warp; t < n; t += DEC_WARPS) {
    int64_t off;
    const int64_t b = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, start + t, &off);
    if (b < 0) {
      for (int64_t g = lane; g < G; g += 32) logits[g * P + t] = -INFINITY;
      continue;
    }
    const T *krow = kc + fkv::key_off(p.kv, b, off, kvh);
    float kf[PL];
#pragma unroll
    for (int j = 0; j < PL; ++j) kf[j] = E::load(krow + lane + 32 * j);
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < PL; ++j) acc += q_s[g * HD + lane + 32 * j] * kf[j];
      acc = fkv::warp_sum(acc);
      if (lane == 0) logits[g * P + t] = acc * p.scale;
    }
  }
  __syncthreads();

  // Softmax numerators per head, in place; m_s / l_s hold the partition max and sum.
  for (int64_t g = warp; g < G; g += DEC_WARPS) {
    float m = -INFINITY;
    for (int64_t t = lane; t < n; t += 32) m = fmaxf(m, logits[g * P + t]);
    m = fkv::warp_max(m);
    float l = 0.f;
    for (int64_t t = lane; t < n; t += 32) {
      const float x = logits[g * P + t];
      const float e = (x == -INFINITY) ? 0.f : expf(x - m);
      logits[g * P + t] = e;
      l += e;
    }
    l = fkv::warp_sum(l);
    if (lane == 0) {
      m_s[g] = m;
      l_s[g] = l;
    }
  }
  __syncthreads();

  // P.V: threads split head_dim (and, for HD 64, the slots into two groups).
  constexpr int LANES = HD < DEC_THREADS ? HD : DEC_THREADS;
  constexpr int GROUPS = DEC_THREADS / LANES;
  constexpr int DPT = HD / LANES;
  const int grp = tid / LANES, ld = tid % LANES;
  const T *vc = static_cast<const T *>(p.kv.value_cache);
  const int64_t NP = p.num_partitions;
  const int64_t Hq = p.num_q_heads;
  for (int64_t g0 = 0; g0 < G; g0 += DEC_GCHUNK) {
    float acc[DPT][DEC_GCHUNK];
#pragma unroll
    for (int k = 0; k < DPT; ++k)
#pragma unroll
      for (int gg = 0; gg < DEC_GCHUNK; ++gg) acc[k][gg] = 0.f;
    for (int64_t t = grp; t < n; t += GROUPS) {
      int64_t off;
      const int64_t b = fkv::live_block(p.win, p.kv.num_blocks, p.kv.block_size, s, start + t, &off);
      if (b < 0) continue;
      const T *vrow = vc + fkv::value_off(p.kv, b, off, kvh);
      float vf[DPT];
#pragma unroll
      for (int k = 0; k < DPT; ++k) vf[k] = E::load(vrow + ld + k * LANES);
#pragma unroll
      for (int gg = 0; gg < DEC_GCHUNK; ++gg) {
        if (g0 + gg < G) {
          const float pr = logits[(g0 + gg) * P + t];
#pragma unroll
          for (int k = 0; k < DPT; ++k) acc[k][gg] += pr * vf[k];
        }
      }
    }
    if (GROUPS > 1) {
      // Fold the slot groups into group 0 through shared memory, one group at a time.
      for (int src = 1; src < GROUPS; ++src) {
        if (grp == src) {
#pragma unroll
          for (int gg = 0; gg < DEC_GCHUNK; ++gg)
#pragma unroll
            for (int k = 0; k < DPT; ++k) red[gg * HD + ld + k * LANES] = acc[k][gg];
        }
        __syncthreads();
        if (grp == 0) {
#pragma unroll
          for (int gg = 0; gg < DEC_GCHUNK; ++gg)
#pragma unroll
            for (int k = 0; k < DPT; ++k) acc[k][gg] += red[gg * HD + ld + k * LANES];
        }
        __syncthreads();
      }
    }
    if (grp == 0) {
#pragma unroll
      for (int gg = 0; gg < DEC_GCHUNK; ++gg) {
        const int64_t g = g0 + gg;
        if (g >= G) break;
        const int64_t h = kvh * G + g;
        const float l = l_s[g];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        if (NP == 1) {
          T *out = static_cast<T *>(p.out) + s * p.o_stride_seq + h * p.o_stride_head;
#pragma unroll
          for (int k = 0; k < DPT; ++k) E::store(out + ld + k * LANES, acc[k][gg] * inv);
        } else {
          const int64_t row = (s * Hq + h) * NP + part;
          float *wo = p.workspace + row * HD;
#pragma unroll
          for (int k = 0; k < DPT; ++k) wo[ld + k * LANES] = acc[k][gg] * inv;
          if (ld == 0) {
            float *ml = p.workspace + p.win.num_seqs * Hq * NP * HD + row * 2;
            ml[0] = l > 0.f ? m_s[g] : -INFINITY;
            ml[1] = l;
          }
        }
      }
    }
  }
}

// Combines the partitions of one (seq, query head): out = sum_p w_p o_p / sum_p w_p with
// w_p = l_p exp(m_p - max m).
template <typename T, int HD>
__device__ void decode_merge(const fkv_decode_params &p) {
  const int64_t h = blockIdx.x, s = blockIdx.y;
  const int64_t NP = p.num_partitions, Hq = p.num_q_heads;
  const int64_t row0 = (s * Hq + h) * NP;
  const float *ml = p.workspace + p.win.num_seqs * Hq * NP * HD + row0 * 2;
  float m = -INFINITY;
  for (int64_t q = 0; q < NP; ++q) m = fmaxf(m, ml[2 * q]);
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (m != -INFINITY) {
      for (int64_t q = 0; q < NP; ++q) {
        const float l = ml[2 * q + 1];
        if (l <= 0.f) continue;
        const float w = l * expf(ml[2 * q] - m);
        num += w * p.workspace[(row0 + q) * HD + d];
        den += w;
      }
    }
    T *out = static_cast<T *>(p.out) + s * p.o_stride_seq + h * p.o_stride_head;
    fkv::Elem<T>::store(out + d, den > 0.f ? num / den : 0.f);
  }
}

__device__ void decode_entry(const fkv_decode_params &p, bool merge) {
  fkv::with_elem(p.kv.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    fkv::with_head_dim(p.kv.head_dim, [&](auto hd) {
      constexpr int HD = decltype(hd)::value;
      merge ? decode_merge<T, HD>(p) : decode_partition<T, HD>(p);
    });
  });
}

}  // namespace

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    fkv_paged_attention_decode(const fkv_decode_params p) {
  decode_entry(p, false);
}

extern "C" __global__ void fkv_paged_attention_decode_merge(const fkv_decode_params p) {
  decode_entry(p, true);
}
