// RMSNorm on the CPU: the ops.h entry points, which run the AVX2 path (rms_norm_avx2.cpp) when
// cpu_use_avx2() and otherwise the portable scalar path below. Both use the same math:
//   forward:      rstd = 1 / sqrt(sum(x^2) / N + eps), y = x * rstd * w;
//   add + norm:   s = round_dt(x + r) is written out, then y = rms_norm(s) of the rounded s;
//   backward:     xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean_j(g * xhat)) + dextra,
//                 dw[j] = sum_i dy * xhat.
// dw: each of a fixed number of row chunks sums into its own fp32 array, then the arrays are
// added in chunk order, so the result never depends on thread timing.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_features.h"
#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

template <DType D, bool HasW, bool Add>
void fwd_rows(const NormFwdArgs& a) {
  using S = storage_t<D>;
  const S* w = static_cast<const S*>(a.w);
  const int64_t n = a.cols;
#pragma omp parallel for schedule(static) if (a.rows * n >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const S* src = row_ptr<D>(a.x, a.x_stride, i);
    if constexpr (Add) {
      const S* r = row_ptr<D>(a.r, a.r_stride, i);
      S* s = row_ptr<D>(a.s, a.s_stride, i);
      for (int64_t j = 0; j < n; ++j) s[j] = from_float<D>(to_float<D>(src[j]) + to_float<D>(r[j]));
      src = s;
    }
    const float ss = lane_sum(n, [&](int64_t j) {
      const float v = to_float<D>(src[j]);
      return v * v;
    });
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + a.eps);
    if (a.rstd) a.rstd[i] = rstd;
    S* y = row_ptr<D>(a.y, a.y_stride, i);
    for (int64_t j = 0; j < n; ++j) {
      float v = to_float<D>(src[j]) * rstd;
      if constexpr (HasW) v *= to_float<D>(w[j]);
      y[j] = from_float<D>(v);
    }
  }
}

template <DType D, bool HasW>
void bwd_rows(const NormBwdArgs& a) {
  using S = storage_t<D>;
  const S* w = static_cast<const S*>(a.w);
  const int64_t n = a.cols;
#pragma omp parallel for schedule(static) if (a.nchunks > 1)
  for (int64_t c = 0; c < a.nchunks; ++c) {
    float* dwp = a.part ? a.part + c * n : nullptr;
    const int64_t end = chunk_begin(a.rows, a.nchunks, c + 1);
    for (int64_t i = chunk_begin(a.rows, a.nchunks, c); i < end; ++i) {
      const S* dy = row_ptr<D>(a.dy, a.dy_stride, i);
      const S* x = row_ptr<D>(a.x, a.x_stride, i);
      const float rstd = a.rstd[i];
      auto xhat = [&](int64_t j) { return to_float<D>(x[j]) * rstd; };
      auto g = [&](int64_t j) {
        if constexpr (HasW) return to_float<D>(dy[j]) * to_float<D>(w[j]);
        else return to_float<D>(dy[j]);
      };
      if (dwp)
        for (int64_t j = 0; j < n; ++j) dwp[j] += to_float<D>(dy[j]) * xhat(j);
      if (!a.dx) continue;
      const float mgx = lane_sum(n, [&](int64_t j) { return g(j) * xhat(j); }) / static_cast<float>(n);
      const S* de = a.dextra ? row_ptr<D>(a.dextra, a.dextra_stride, i) : nullptr;
      S* dx = row_ptr<D>(a.dx, a.dx_stride, i);
      for (int64_t j = 0; j < n; ++j) {
        float v = rstd * (g(j) - xhat(j) * mgx);
        if (de) v += to_float<D>(de[j]);
        dx[j] = from_float<D>(v);
      }
    }
  }
}

void fwd(const NormFwdArgs& a) {
  if (a.rows == 0) return;
  if (cpu_use_avx2()) return avx2::rms_norm_fwd(a);
  dispatch_dtype(a.dt, [&](auto d) {
    dispatch_bool(a.w != nullptr, [&](auto hw) {
      dispatch_bool(a.r != nullptr, [&](auto add) {
        fwd_rows<decltype(d)::value, decltype(hw)::value, decltype(add)::value>(a);
      });
    });
  });
}

}  // namespace

void rms_norm_fwd(const void* x, int64_t x_stride, const void* w, void* y, int64_t y_stride,
                  float* rstd, int64_t rows, int64_t cols, float eps, DType dt) {
  fwd({x, x_stride, nullptr, 0, nullptr, 0, w, nullptr, y, y_stride, nullptr, rstd, rows, cols, eps, dt});
}

void add_rms_norm_fwd(const void* x, int64_t x_stride, const void* r, int64_t r_stride, void* s,
                      int64_t s_stride, const void* w, void* y, int64_t y_stride, float* rstd,
                      int64_t rows, int64_t cols, float eps, DType dt) {
  fwd({x, x_stride, r, r_stride, s, s_stride, w, nullptr, y, y_stride, nullptr, rstd, rows, cols, eps, dt});
}

void rms_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const float* rstd, const void* dextra, int64_t dextra_stride,
                  void* dx, int64_t dx_stride, float* dw, int64_t rows, int64_t cols, DType dt) {
  if (rows == 0) {  // empty sum
    if (dw) std::fill(dw, dw + cols, 0.0f);
    return;
  }
  if (!dx && !dw) return;
  const int64_t nchunks = num_chunks(rows, cols);
  std::vector<float> part(dw ? nchunks * cols : 0, 0.0f);
  const NormBwdArgs a{dy, dy_stride, x, x_stride, w, nullptr, rstd, dextra, dextra_stride, dx, dx_stride,
                      dw ? part.data() : nullptr, nchunks, rows, cols, dt};
  if (cpu_use_avx2()) {
    avx2::rms_norm_bwd(a);
  } else {
    dispatch_dtype(dt, [&](auto d) {
      dispatch_bool(w != nullptr, [&](auto hw) { bwd_rows<decltype(d)::value, decltype(hw)::value>(a); });
    });
  }
  if (dw) reduce_chunks(part.data(), nchunks, cols, cols, dw);
}

}  // namespace fastllm::cpu
