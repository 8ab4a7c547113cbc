// LayerNorm forward and backward on CUDA: the contract of cuda/ops.h, the math of cpu/ops.h.
// Kernels and launch schemes: norm_fwd.cuh (forward), norm_bwd.cuh + norm_bwd_reduce.cu (backward).
//   forward:  mean, biased variance (two passes over the row held in registers), rstd =
//             rsqrt(var + eps), y = (x - mean) * rstd * w + b; mean/rstd stored when non-null.
//   backward: xhat = (x - mean) * rstd, g = dy * w;
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dw = sum_rows dy * xhat,
//             db = sum_rows dy through per-block partial rows in `workspace` (deterministic).
// rows == 0 returns without touching the device.
#include "norm_bwd.cuh"
#include "norm_fwd.cuh"
#include "ops.h"

namespace fastllm::cuda {

void layer_norm_fwd(const void* x, int64_t x_stride, const void* w, const void* b, void* y,
                    int64_t y_stride, float* mean, float* rstd, int64_t rows, int64_t cols,
                    float eps, DType dt, uintptr_t stream) {
  norm::FwdArgs a{};
  a.x = x;
  a.xs = x_stride;
  a.w = w;
  a.b = b;
  a.y = y;
  a.ys = y_stride;
  a.mean = mean;
  a.rstd = rstd;
  a.rows = rows;
  a.eps = eps;
  norm::fwd_entry<norm::Op::kLayer>("layer_norm_fwd", a, cols, dt, stream);
}

void layer_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                    const void* w, const float* mean, const float* rstd, void* dx,
                    int64_t dx_stride, float* dw, float* db, float* workspace, int64_t rows,
                    int64_t cols, DType dt, uintptr_t stream) {
  norm::BwdArgs a{};
  a.dy = dy;
  a.dys = dy_stride;
  a.x = x;
  a.xs = x_stride;
  a.w = w;
  a.mean = mean;
  a.rstd = rstd;
  a.dx = dx;
  a.dxs = dx_stride;
  a.ws = workspace;
  a.rows = rows;
  norm::bwd_entry<true>("layer_norm_bwd", a, cols, dw, db, dt, stream);
}

}  // namespace fastllm::cuda
