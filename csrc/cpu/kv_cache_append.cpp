// Appending to a KV cache on the CPU (fastllm/reference/decode_attention.py, kv_cache_append): for each
// sequence b, new token t and kv head, the key row (rotated when cos/sin are given) and the value row are
// written at position seqlens[b] + t, rounded once to the cache dtype or quantised to int8 with a per-row
// scale; the queries are rotated into q_out. Rotation ("rotate half", fp32, positions p = seqlens[b] + t):
//   y[j] = x[j] cos[p, j] - x[j + R/2] sin[p, j]   (j < R/2),   y[j] = x[j] cos[p, j] + x[j - R/2] sin[p, j]
//   (R/2 <= j < R), y[j] = x[j] beyond R. The work is a few rows per call: one thread, plain loops.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

constexpr float kInt8Max = 127.0f;

// x (D,) fp32 -> y (D,) fp32, rotated at table row `c`, `s` (R features), or copied when c is nullptr.
inline void rotate(const float* x, const float* c, const float* s, int64_t rot, int64_t d, float* y) {
  const int64_t half = rot / 2;
  int64_t j = 0;
  if (c) {
    for (; j < half; ++j) y[j] = x[j] * c[j] - x[j + half] * s[j];
    for (; j < rot; ++j) y[j] = x[j] * c[j] + x[j - half] * s[j];
  }
  for (; j < d; ++j) y[j] = x[j];
}

template <DType D>
inline void load_row(const storage_t<D>* p, int64_t d, float* x) {
  for (int64_t j = 0; j < d; ++j) x[j] = to_float<D>(p[j]);
}

// Writes fp32 row x to a cache row: rounded to D, or int8 codes and their scale.
template <DType D, bool I8>
inline void write_row(const float* x, int64_t d, void* dst, float* scale) {
  if constexpr (I8) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t j = 0; j < d; ++j) {
      amax = std::max(amax, std::fabs(x[j]));
      nan |= std::isnan(x[j]);
    }
    int8_t* out = static_cast<int8_t*>(dst);
    if (nan) {  // the row reads back as NaN, as a float cache's would: scale NaN, codes 0
      std::fill(out, out + d, int8_t(0));
      *scale = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const float sc = amax / kInt8Max, safe = sc > 0.0f ? sc : 1.0f;
    for (int64_t j = 0; j < d; ++j) {  // (an inf: NaN / inf codes; the scale inf makes the row NaN anyway)
      const float c = std::min(std::floor(std::fabs(x[j]) / safe + 0.5f), kInt8Max);
      out[j] = std::isnan(c) ? int8_t(0) : static_cast<int8_t>(x[j] < 0.0f ? -c : c);
    }
    *scale = sc;
  } else {
    storage_t<D>* out = static_cast<storage_t<D>*>(dst);
    for (int64_t j = 0; j < d; ++j) out[j] = from_float<D>(x[j]);
  }
}

template <DType D, bool I8>
void append(const KVAppendArgs& a) {
  using S = storage_t<D>;
  const int64_t esize = I8 ? 1 : sizeof(S), d = a.d;
  alignas(32) float x[kMaxDecodeHeadDim], y[kMaxDecodeHeadDim];
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < a.lnew; ++t) {
      const int64_t pos = a.seqlens[b] + t;
      const int64_t blk = a.block_table ? a.block_table[b * a.bt_stride + pos / a.page] : b;
      const int64_t off = a.block_table ? pos % a.page : pos;
      const float* c = a.cos ? a.cos + pos * a.cs_stride : nullptr;
      const float* s = a.sin ? a.sin + pos * a.cs_stride : nullptr;
      for (int64_t h = 0; h < a.hkv; ++h) {
        const int64_t kidx = blk * a.k_stride[0] + off * a.k_stride[1] + h * a.k_stride[2];
        const int64_t vidx = blk * a.v_stride[0] + off * a.v_stride[1] + h * a.v_stride[2];
        load_row<D>(static_cast<const S*>(a.k_new) + b * a.kn_stride[0] + t * a.kn_stride[1] + h * a.kn_stride[2],
                    d, x);
        rotate(x, c, s, a.rot, d, y);
        write_row<D, I8>(y, d, static_cast<char*>(a.k) + kidx * esize,
                         I8 ? a.k_scale + blk * a.ks_stride[0] + off * a.ks_stride[1] + h * a.ks_stride[2] : nullptr);
        load_row<D>(static_cast<const S*>(a.v_new) + b * a.vn_stride[0] + t * a.vn_stride[1] + h * a.vn_stride[2],
                    d, x);
        write_row<D, I8>(x, d, static_cast<char*>(a.v) + vidx * esize,
                         I8 ? a.v_scale + blk * a.vs_stride[0] + off * a.vs_stride[1] + h * a.vs_stride[2] : nullptr);
      }
      if (!a.q) continue;
      for (int64_t h = 0; h < a.hq; ++h) {
        load_row<D>(static_cast<const S*>(a.q) + b * a.q_stride[0] + t * a.q_stride[1] + h * a.q_stride[2], d, x);
        rotate(x, c, s, a.rot, d, y);
        write_row<D, false>(y, d, static_cast<S*>(a.q_out) + ((b * a.lnew + t) * a.hq + h) * d, nullptr);
      }
    }
  }
}

}  // namespace

void kv_cache_append(const KVAppendArgs& a) {
  dispatch_dtype(a.dt, [&](auto dt) {
    dispatch_bool(a.int8, [&](auto i8) { append<decltype(dt)::value, decltype(i8)::value>(a); });
  });
}

}  // namespace fastllm::cpu
