// Private to csrc/cpu: the decode-attention driver shared by the scalar (decode_attention.cpp) and
// AVX2 (decode_attention_avx2.cpp) paths. Each path supplies an `Ops` policy with the two inner loops
//   Ops::dot<D>(q, k, n)       = sum_j q[j] * k[j]      (q fp32, k a cache row of dtype D)
//   Ops::axpy<D>(acc, p, v, n):  acc[j] += p * v[j]
//   Ops::exp_sum(s, n, m)       : s[j] = exp(s[j] - m) in place (s[j] <= m), returns sum_j s[j]
// and dot_i8 / axpy_i8 for int8 rows (the row's scale is applied by the driver).
// Math (fastllm/reference/decode_attention.py): query i of sequence b sits at position L_b - Lq + i and sees
// the keys j < n_i, n_i = min(L_b, L_b - Lq + i + 1) when causal, else L_b; with s_j = scale * q . k_j,
//   out = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)      (fp32; 0 when n_i <= 0).
// One work item is one (sequence, query, query head); OpenMP over the items.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

// (block, offset) of position j of sequence b: (b, j), or through the block table for a paged cache.
inline void cache_slot(const DecodeAttnArgs& a, int64_t b, int64_t j, int64_t& blk, int64_t& off) {
  if (a.block_table) {
    blk = a.block_table[b * a.bt_stride + j / a.page];
    off = j % a.page;
  } else {
    blk = b;
    off = j;
  }
}

template <class Ops, DType D, bool I8>
void decode_attention_items(const DecodeAttnArgs& a) {
  using S = storage_t<D>;
  using C = std::conditional_t<I8, int8_t, S>;  // cache element
  const int64_t items = a.batch * a.lq * a.hq, group = a.hq / a.hkv, d = a.d;
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) longest = std::max<int64_t>(longest, a.seqlens[b]);
  const bool parallel = items > 1 && items * longest * d >= kParallelMinElems;
#pragma omp parallel if (parallel)
  {
    std::vector<float> s(std::max<int64_t>(longest, 1));
    alignas(32) float qf[kMaxDecodeHeadDim];
    alignas(32) float acc[kMaxDecodeHeadDim];
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / (a.lq * a.hq), i = (it / a.hq) % a.lq, h = it % a.hq, hk = h / group;
      const int64_t len = a.seqlens[b];
      const int64_t n = a.causal ? std::min(len, len - a.lq + i + 1) : len;
      S* out = static_cast<S*>(a.out) + ((b * a.lq + i) * a.hq + h) * d;
      if (n <= 0) {
        std::fill(out, out + d, from_float<D>(0.0f));
        continue;
      }
      const S* q = static_cast<const S*>(a.q) + b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2];
      for (int64_t j = 0; j < d; ++j) qf[j] = to_float<D>(q[j]);
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        int64_t blk, off;
        cache_slot(a, b, j, blk, off);
        const C* k = static_cast<const C*>(a.k) + blk * a.k_stride[0] + off * a.k_stride[1] + hk * a.k_stride[2];
        float dot;
        if constexpr (I8) {
          dot = Ops::dot_i8(qf, k, d) * a.k_scale[blk * a.ks_stride[0] + off * a.ks_stride[1] + hk * a.ks_stride[2]];
        } else {
          dot = Ops::template dot<D>(qf, k, d);
        }
        s[j] = dot * a.scale;
        m = std::max(m, s[j]);
      }
      const float sum = Ops::exp_sum(s.data(), n, m);
      std::fill(acc, acc + d, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        int64_t blk, off;
        cache_slot(a, b, j, blk, off);
        const C* v = static_cast<const C*>(a.v) + blk * a.v_stride[0] + off * a.v_stride[1] + hk * a.v_stride[2];
        if constexpr (I8) {
          Ops::axpy_i8(acc, s[j] * a.v_scale[blk * a.vs_stride[0] + off * a.vs_stride[1] + hk * a.vs_stride[2]], v, d);
        } else {
          Ops::template axpy<D>(acc, s[j], v, d);
        }
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < d; ++j) out[j] = from_float<D>(acc[j] * inv);
    }
  }
}

template <class Ops>
void decode_attention_run(const DecodeAttnArgs& a) {
  dispatch_dtype(a.dt, [&](auto dt) {
    dispatch_bool(a.int8, [&](auto i8) { decode_attention_items<Ops, decltype(dt)::value, decltype(i8)::value>(a); });
  });
}

}  // namespace
}  // namespace fastllm::cpu
