// Private to csrc/cpu: the decode-attention driver shared by the scalar (decode_attention.cpp) and
// AVX2 (decode_attention_avx2.cpp) paths. Each path supplies an `Ops` policy with the inner loops over a
// block of kKeyBlock cache rows (row t at rows[t], of dtype D or int8 when I8; int8 scales applied by the driver):
//   Ops::dots<D, I8>(q, rows, n, out)        out[t] = sum_j q[j] * rows[t][j], t < kKeyBlock (q fp32)
//   Ops::axpys<D, I8>(acc, p, rows, nr, n)   acc[j] += sum_{t < nr} p[t] * rows[t][j]
//   Ops::exp_sum(s, n, m)                    s[j] = exp(s[j] - m) in place (s[j] <= m), returns sum_j s[j]
// Math (fastllm/reference/decode_attention.py): query i of sequence b sits at position L_b - Lq + i and sees
// the keys j < n_i, n_i = min(L_b, L_b - Lq + i + 1) when causal, else L_b; with s_j = scale * q . k_j,
//   out = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)      (fp32; 0 when n_i <= 0).
// OpenMP over work items of (sequence, key range): see decode_splits.
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

// Work items: (sequence b, key range sp). An item's query rows are all of the sequence's Lq x Hq queries, ordered
// by kv head (row r: kv head r / (group Lq), query head hk group + (r / Lq) % group, query r % Lq), taken
// kRowsPerPass at a time; per block of kKeyBlock positions it reads every kv head's K (then V) rows, adjacent in
// memory, once for all the pass's rows that read them (GQA), so each thread streams one contiguous range of the
// cache. The longest sequence's keys are cut into `splits` equal ranges (a shorter sequence's last ones are
// shorter or empty) and the partial results (m, sum, unnormalised acc)
// combined through their log-sum-exp: enough items for every thread to take kItemsPerThread, at least
// kMinSplitKeys positions each, and no range longer than kMaxSplitKeys (the scores of a pass,
// kRowsPerPass x kMaxSplitKeys floats, stay in L2).
constexpr int64_t kRowsPerPass = 64, kItemsPerThread = 4, kMinSplitKeys = 64, kMaxSplitKeys = 1024;
constexpr int kKeyBlock = 8;  // cache rows per Ops::dots / Ops::axpys call
// Every kv head's rows are fetched into L2 this many positions ahead of their use: SmolLM2's cache (3 kv heads,
// D = 64, fp32) at 2048 positions over 30 layers, from DRAM on a 2-core Zen 4, 6.7 -> 3.3-3.7 ms (8-32 ahead
// alike; 128-256 ahead or into L1: 4.7-6.9 ms).
constexpr int64_t kPrefetchKeys = 16;

template <DType D, bool I8>
using cache_t = std::conditional_t<I8, int8_t, storage_t<D>>;  // a cache element

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline int64_t decode_splits(const DecodeAttnArgs& a, int64_t longest) {
  if (a.splits > 0) return std::min(a.splits, std::max<int64_t>(longest, 1));  // more would all be empty
  const int64_t batch = std::max<int64_t>(a.batch, 1), threads = omp_get_max_threads();
  const int64_t fill =
      std::min(ceil_div(kItemsPerThread * threads, batch), std::max<int64_t>(1, longest / kMinSplitKeys));
  return std::max({int64_t(1), fill, ceil_div(longest, kMaxSplitKeys)});
}

// The rows [r0, r1) of sequence b over its keys [j0, j1): per row, m (max score; -inf if it sees none of these
// keys), sum (of exp(s - m)) and acc (sum of exp(s - m) v, d floats); qf: (r1 - r0) x d, s: (r1 - r0) x w scratch.
template <class Ops, DType D, bool I8>
void decode_rows(const DecodeAttnArgs& a, int64_t b, int64_t r0, int64_t r1, int64_t j0, int64_t j1, int64_t w,
                 float* qf, float* s, float* m, float* sum, float* acc) {
  using S = storage_t<D>;
  using C = cache_t<D, I8>;
  const int64_t group = a.hq / a.hkv, per_kv = group * a.lq, d = a.d, len = a.seqlens[b], nr = r1 - r0;
  int64_t hi[kRowsPerPass], top = j0;  // row r sees the keys [j0, hi[r])
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = r0 + r, i = row % a.lq, h = row / a.lq;  // h = hk * group + g
    hi[r] = std::min(j1, a.causal ? std::min(len, len - a.lq + i + 1) : len);
    top = std::max(top, hi[r]);
    const S* q = static_cast<const S*>(a.q) + b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2];
    for (int64_t j = 0; j < d; ++j) qf[r * d + j] = to_float<D>(q[j]);
    m[r] = -INFINITY;
  }
  const C* rp[kKeyBlock];  // a block's rows of one kv head (a partial block repeats its last: those dots are dropped)
  float rs[kKeyBlock], out[kKeyBlock];  // their int8 scales (1 otherwise), and one query row's dots
  // f(r, hk, n) for the pass's rows that see n > 0 of the positions [jb, jb + nj), after pointing rp / rs at hk's
  const int64_t row_bytes = d * static_cast<int64_t>(I8 ? 1 : sizeof(S));
  auto for_rows = [&](const void* base, const int64_t* st, const float* scales, const int64_t* ss, int64_t jb,
                      int nj, auto&& f) {
    for (int64_t j = jb + kPrefetchKeys; j < std::min(top, jb + kPrefetchKeys + nj); ++j) {  // every kv head's row
      int64_t pb, po;
      cache_slot(a, b, j, pb, po);
      for (int64_t hk = 0; hk < a.hkv; ++hk) {
        const char* p =
            reinterpret_cast<const char*>(static_cast<const C*>(base) + pb * st[0] + po * st[1] + hk * st[2]);
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 2);  // into L2 (prefetcht1)
      }
    }
    int64_t blk[kKeyBlock], off[kKeyBlock];
    for (int t = 0; t < kKeyBlock; ++t) cache_slot(a, b, jb + std::min(t, nj - 1), blk[t], off[t]);
    int64_t cur = -1;  // the kv head rp points at
    for (int64_t r = 0; r < nr; ++r) {
      const int n = static_cast<int>(std::min<int64_t>(nj, hi[r] - jb));
      if (n <= 0) continue;
      const int64_t hk = (r0 + r) / per_kv;
      if (hk != cur) {
        cur = hk;
        for (int t = 0; t < kKeyBlock; ++t) {
          rp[t] = static_cast<const C*>(base) + blk[t] * st[0] + off[t] * st[1] + hk * st[2];
          rs[t] = I8 ? scales[blk[t] * ss[0] + off[t] * ss[1] + hk * ss[2]] : 1.0f;
        }
      }
      f(r, n);
    }
  };
  for (int64_t jb = j0; jb < top; jb += kKeyBlock) {  // scores
    const int nj = static_cast<int>(std::min<int64_t>(kKeyBlock, top - jb));
    for_rows(a.k, a.k_stride, a.k_scale, a.ks_stride, jb, nj, [&](int64_t r, int n) {
      Ops::template dots<D, I8>(qf + r * d, rp, d, out);
      float* sr = s + r * w + (jb - j0);
      for (int t = 0; t < n; ++t) {
        sr[t] = (I8 ? out[t] * rs[t] : out[t]) * a.scale;
        m[r] = std::max(m[r], sr[t]);
      }
    });
  }
  for (int64_t r = 0; r < nr; ++r) {
    sum[r] = hi[r] > j0 ? Ops::exp_sum(s + r * w, hi[r] - j0, m[r]) : 0.0f;
    std::fill(acc + r * d, acc + (r + 1) * d, 0.0f);
  }
  for (int64_t jb = j0; jb < top; jb += kKeyBlock) {  // values
    const int nj = static_cast<int>(std::min<int64_t>(kKeyBlock, top - jb));
    for_rows(a.v, a.v_stride, a.v_scale, a.vs_stride, jb, nj, [&](int64_t r, int n) {
      const float* sr = s + r * w + (jb - j0);
      for (int t = 0; t < n; ++t) out[t] = I8 ? sr[t] * rs[t] : sr[t];
      Ops::template axpys<D, I8>(acc + r * d, out, rp, n, d);
    });
  }
}

template <class Ops, DType D, bool I8>
void decode_attention_items(const DecodeAttnArgs& a) {
  using S = storage_t<D>;
  const int64_t d = a.d, rows = a.lq * a.hq;
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) longest = std::max<int64_t>(longest, a.seqlens[b]);
  const int64_t splits = decode_splits(a, longest), span = std::max<int64_t>(ceil_div(longest, splits), 1);
  const int64_t items = a.batch * splits;
  // split results per (item, row): m, sum, acc (combined below); unsplit rows are written out directly
  std::vector<float> part(splits > 1 ? items * rows * (d + 2) : 0);
  auto out_row = [&](int64_t b, int64_t row) {  // row: query head row / Lq, query row % Lq
    return static_cast<S*>(a.out) + ((b * a.lq + row % a.lq) * a.hq + row / a.lq) * d;
  };
  const bool parallel = items > 1 && a.batch * rows * longest * d >= kParallelMinElems;
#pragma omp parallel if (parallel)
  {
    const int64_t pass = std::min(rows, kRowsPerPass);
    std::vector<float> s(pass * span), qf(pass * d), acc(pass * d);
    float m[kRowsPerPass], sum[kRowsPerPass];
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / splits, sp = it % splits, len = a.seqlens[b];
      const int64_t j0 = std::min(sp * span, len), j1 = std::min(j0 + span, len);
      for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
        const int64_t r1 = std::min(rows, r0 + kRowsPerPass);
        decode_rows<Ops, D, I8>(a, b, r0, r1, j0, j1, span, qf.data(), s.data(), m, sum, acc.data());
        for (int64_t r = r0; r < r1; ++r) {
          const float* ar = acc.data() + (r - r0) * d;
          if (splits == 1) {  // a row that sees no key: 0
            const float inv = sum[r - r0] > 0.0f ? 1.0f / sum[r - r0] : 0.0f;
            S* o = out_row(b, r);
            for (int64_t j = 0; j < d; ++j) o[j] = from_float<D>(ar[j] * inv);
          } else {
            float* pr = part.data() + (it * rows + r) * (d + 2);
            pr[0] = m[r - r0], pr[1] = sum[r - r0];
            std::copy(ar, ar + d, pr + 2);
          }
        }
      }
    }
    if (splits > 1) {  // (after the loop's barrier) out = sum_sp e^(m_sp - M) acc_sp / sum_sp e^(m_sp - M) sum_sp
#pragma omp for schedule(static)
      for (int64_t x = 0; x < a.batch * rows; ++x) {
        const int64_t b = x / rows, r = x % rows;
        auto at = [&](int64_t sp) { return part.data() + ((b * splits + sp) * rows + r) * (d + 2); };
        float top = -INFINITY, total = 0.0f;
        for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, at(sp)[0]);
        float o[kMaxDecodeHeadDim] = {};
        for (int64_t sp = 0; sp < splits && top > -INFINITY; ++sp) {
          const float* pr = at(sp);
          if (pr[1] == 0.0f) continue;  // no key of this row in this range
          const float c = std::exp(pr[0] - top);
          total += c * pr[1];
          for (int64_t j = 0; j < d; ++j) o[j] += c * pr[2 + j];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        S* dst = out_row(b, r);
        for (int64_t j = 0; j < d; ++j) dst[j] = from_float<D>(o[j] * inv);
      }
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
