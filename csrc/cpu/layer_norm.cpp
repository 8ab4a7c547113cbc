// LayerNorm on the CPU: the ops.h entry points, which run the AVX2 path (layer_norm_avx2.cpp)
// when cpu_use_avx2() and otherwise the portable scalar path below. Both use the same math:
//   forward:  mean0 = sum(x) / N, d = x - mean0, mean = mean0 + sum(d) / N,
//             var = (sum(d^2) - sum(d)^2 / N) / N (corrected two-pass, accurate when
//             |mean| >> std), rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * w + b;
//   backward: xhat = (x - mean) * rstd, g = dy * w,
//             dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)),
//             dw[j] = sum_i dy * xhat, db[j] = sum_i dy.
// dw/db: each of a fixed number of row chunks sums into its own fp32 array, then the arrays are
// added in chunk order, so the result never depends on thread timing.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_features.h"
#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

template <DType D, bool HasW, bool HasB>
void fwd_rows(const NormFwdArgs& a) {
  using S = storage_t<D>;
  const S* w = static_cast<const S*>(a.w);
  const S* b = static_cast<const S*>(a.b);
  const int64_t n = a.cols;
  const float inv_n = 1.0f / static_cast<float>(n);
#pragma omp parallel for schedule(static) if (a.rows * n >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const S* x = row_ptr<D>(a.x, a.x_stride, i);
    S* y = row_ptr<D>(a.y, a.y_stride, i);
    const float m0 = lane_sum(n, [&](int64_t j) { return to_float<D>(x[j]); }) * inv_n;
    const float s1 = lane_sum(n, [&](int64_t j) { return to_float<D>(x[j]) - m0; });
    const float s2 = lane_sum(n, [&](int64_t j) {
      const float d = to_float<D>(x[j]) - m0;
      return d * d;
    });
    float var = (s2 - s1 * s1 * inv_n) * inv_n;
    var = var < 0.0f ? 0.0f : var;  // keeps NaN
    const float mean = m0 + s1 * inv_n;
    const float rstd = 1.0f / std::sqrt(var + a.eps);
    if (a.mean) a.mean[i] = mean;
    if (a.rstd) a.rstd[i] = rstd;
    for (int64_t j = 0; j < n; ++j) {
      float v = (to_float<D>(x[j]) - mean) * rstd;
      if constexpr (HasW) v *= to_float<D>(w[j]);
      if constexpr (HasB) v += to_float<D>(b[j]);
      y[j] = from_float<D>(v);
    }
  }
}

template <DType D, bool HasW>
void bwd_rows(const NormBwdArgs& a) {
  using S = storage_t<D>;
  const S* w = static_cast<const S*>(a.w);
  const int64_t n = a.cols;
  const float inv_n = 1.0f / static_cast<float>(n);
#pragma omp parallel for schedule(static) if (a.nchunks > 1)
  for (int64_t c = 0; c < a.nchunks; ++c) {
    float* dwp = a.part ? a.part + c * 2 * n : nullptr;
    float* dbp = dwp ? dwp + n : nullptr;
    const int64_t end = chunk_begin(a.rows, a.nchunks, c + 1);
    for (int64_t i = chunk_begin(a.rows, a.nchunks, c); i < end; ++i) {
      const S* dy = row_ptr<D>(a.dy, a.dy_stride, i);
      const S* x = row_ptr<D>(a.x, a.x_stride, i);
      const float mean = a.mean[i], rstd = a.rstd[i];
      auto xhat = [&](int64_t j) { return (to_float<D>(x[j]) - mean) * rstd; };
      auto g = [&](int64_t j) {
        if constexpr (HasW) return to_float<D>(dy[j]) * to_float<D>(w[j]);
        else return to_float<D>(dy[j]);
      };
      if (dwp) {
        for (int64_t j = 0; j < n; ++j) {
          dwp[j] += to_float<D>(dy[j]) * xhat(j);
          dbp[j] += to_float<D>(dy[j]);
        }
      }
      if (!a.dx) continue;
      const float mg = lane_sum(n, g) * inv_n;
      const float mgx = lane_sum(n, [&](int64_t j) { return g(j) * xhat(j); }) * inv_n;
      S* dx = row_ptr<D>(a.dx, a.dx_stride, i);
      for (int64_t j = 0; j < n; ++j) dx[j] = from_float<D>(rstd * (g(j) - mg - xhat(j) * mgx));
    }
  }
}

}  // namespace

void layer_norm_fwd(const void* x, int64_t x_stride, const void* w, const void* b, void* y,
                    int64_t y_stride, float* mean, float* rstd, int64_t rows, int64_t cols,
                    float eps, DType dt) {
  if (rows == 0) return;
  const NormFwdArgs a{x, x_stride, nullptr, 0, nullptr, 0, w, b, y, y_stride, mean, rstd, rows, cols, eps, dt};
  if (cpu_use_avx2()) return avx2::layer_norm_fwd(a);
  dispatch_dtype(dt, [&](auto d) {
    dispatch_bool(w != nullptr, [&](auto hw) {
      dispatch_bool(b != nullptr, [&](auto hb) {
        fwd_rows<decltype(d)::value, decltype(hw)::value, decltype(hb)::value>(a);
      });
    });
  });
}

void layer_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                    const void* w, const float* mean, const float* rstd, void* dx,
                    int64_t dx_stride, float* dw, float* db, int64_t rows, int64_t cols, DType dt) {
  if (rows == 0) {  // empty sums
    if (dw) std::fill(dw, dw + cols, 0.0f);
    if (db) std::fill(db, db + cols, 0.0f);
    return;
  }
  if (!dx && !dw && !db) return;
  const int64_t nchunks = num_chunks(rows, cols);
  std::vector<float> part((dw || db) ? nchunks * 2 * cols : 0, 0.0f);
  const NormBwdArgs a{dy, dy_stride, x, x_stride, w, mean, rstd, nullptr, 0, dx, dx_stride,
                      part.empty() ? nullptr : part.data(), nchunks, rows, cols, dt};
  if (cpu_use_avx2()) {
    avx2::layer_norm_bwd(a);
  } else {
    dispatch_dtype(dt, [&](auto d) {
      dispatch_bool(w != nullptr, [&](auto hw) { bwd_rows<decltype(d)::value, decltype(hw)::value>(a); });
    });
  }
  if (dw) reduce_chunks(part.data(), nchunks, 2 * cols, cols, dw);
  if (db) reduce_chunks(part.data() + cols, nchunks, 2 * cols, cols, db);
}

}  // namespace fastllm::cpu
