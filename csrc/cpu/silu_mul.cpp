// SwiGLU's elementwise gate on the CPU (ops.h): y = silu(g) * u = g * sigmoid(g) * u, in fp32, rounded once to
// the output dtype. The AVX2 path (silu_mul_avx2.cpp) runs when cpu_use_avx2(); this file holds the
// portable scalar path. Rows in parallel (OpenMP) above kParallelMinElems elements.
#include <cmath>

#include "../common/cpu_features.h"
#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

template <DType D>
void rows(const RowArgs& a) {
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const auto* g = row_ptr<D>(a.a, a.a_stride, i);
    const auto* u = row_ptr<D>(a.b, a.b_stride, i);
    auto* y = row_ptr<D>(a.out, a.out_stride, i);
    for (int64_t j = 0; j < a.cols; ++j) {
      const float gj = to_float<D>(g[j]);
      y[j] = from_float<D>(gj / (1.0f + std::exp(-gj)) * to_float<D>(u[j]));
    }
  }
}

}  // namespace

void silu_mul(const void* g, int64_t g_stride, const void* u, int64_t u_stride, void* y, int64_t y_stride,
              int64_t rows_, int64_t cols, DType dt) {
  if (rows_ == 0) return;
  const RowArgs a{g, g_stride, u, u_stride, y, y_stride, rows_, cols, dt};
  if (cpu_use_avx2()) return avx2::silu_mul(a);
  dispatch_dtype(dt, [&](auto d) { rows<decltype(d)::value>(a); });
}

}  // namespace fastllm::cpu
