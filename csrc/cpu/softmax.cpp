// Softmax over the last dimension on the CPU: the ops.h entry points, which run the AVX2 path
// (softmax_avx2.cpp) when cpu_use_avx2() and otherwise the portable scalar path below.
//   forward:  m = max_j x, y = exp(x - m) / sum_j exp(x - m)   (fp32 accumulation);
//             a row of all -inf, or holding +inf or NaN, comes out all NaN, as in torch;
//   backward: dx = y * (dy - sum_j dy * y), the sum accumulated in fp64.
#include <cmath>

#include "../common/cpu_features.h"
#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

template <DType D>
void fwd_rows(const RowArgs& a) {
  using S = storage_t<D>;
  const int64_t n = a.cols;
#pragma omp parallel for schedule(static) if (a.rows * n >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const S* x = row_ptr<D>(a.a, a.a_stride, i);
    S* y = row_ptr<D>(a.out, a.out_stride, i);
    float m = -INFINITY;  // a NaN is skipped here and turns the sum into NaN below
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float<D>(x[j]);
      m = v > m ? v : m;
    }
    const float inv = 1.0f / lane_sum(n, [&](int64_t j) { return std::exp(to_float<D>(x[j]) - m); });
    for (int64_t j = 0; j < n; ++j) y[j] = from_float<D>(std::exp(to_float<D>(x[j]) - m) * inv);
  }
}

template <DType D>
void bwd_rows(const RowArgs& a) {
  using S = storage_t<D>;
  const int64_t n = a.cols;
#pragma omp parallel for schedule(static) if (a.rows * n >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const S* y = row_ptr<D>(a.a, a.a_stride, i);
    const S* dy = row_ptr<D>(a.b, a.b_stride, i);
    S* dx = row_ptr<D>(a.out, a.out_stride, i);
    double acc = 0.0;  // fp64: dy - dot cancels, so the dot's rounding error would dominate dx
    for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(to_float<D>(dy[j])) * to_float<D>(y[j]);
    const float dot = static_cast<float>(acc);
    for (int64_t j = 0; j < n; ++j) dx[j] = from_float<D>(to_float<D>(y[j]) * (to_float<D>(dy[j]) - dot));
  }
}

}  // namespace

void softmax_fwd(const void* x, int64_t x_stride, void* y, int64_t y_stride, int64_t rows,
                 int64_t cols, DType dt) {
  if (rows == 0) return;
  const RowArgs a{x, x_stride, nullptr, 0, y, y_stride, rows, cols, dt};
  if (cpu_use_avx2()) return avx2::softmax_fwd(a);
  dispatch_dtype(dt, [&](auto d) { fwd_rows<decltype(d)::value>(a); });
}

void softmax_bwd(const void* y, int64_t y_stride, const void* dy, int64_t dy_stride, void* dx,
                 int64_t dx_stride, int64_t rows, int64_t cols, DType dt) {
  if (rows == 0) return;
  const RowArgs a{y, y_stride, dy, dy_stride, dx, dx_stride, rows, cols, dt};
  if (cpu_use_avx2()) return avx2::softmax_bwd(a);
  dispatch_dtype(dt, [&](auto d) { bwd_rows<decltype(d)::value>(a); });
}

}  // namespace fastllm::cpu
