// RMSNorm forward, fused residual-add + RMSNorm forward, and RMSNorm backward on CUDA: the contract
// of cuda/ops.h, the math of cpu/ops.h. Kernels and launch schemes: norm_fwd.cuh (forward),
// norm_bwd.cuh + norm_bwd_reduce.cu (backward).
//   rms_norm_fwd:     rstd = rsqrt(mean(x^2) + eps), y = x * rstd * w.
//   add_rms_norm_fwd: s = round_to_dtype(x + r) written to s; y = rms_norm(s) from the rounded s.
//   rms_norm_bwd:     xhat = x * rstd, g = dy * w; dx = rstd * (g - xhat * mean(g * xhat)) + dextra;
//                     dw = sum_rows dy * xhat through per-block partial rows in `workspace`.
// rows == 0 returns without touching the device.
#include "norm_bwd.cuh"
#include "norm_fwd.cuh"
#include "ops.h"

namespace fastllm::cuda {

void rms_norm_fwd(const void* x, int64_t x_stride, const void* w, void* y, int64_t y_stride,
                  float* rstd, int64_t rows, int64_t cols, float eps, DType dt, uintptr_t stream) {
  norm::FwdArgs a{};
  a.x = x;
  a.xs = x_stride;
  a.w = w;
  a.y = y;
  a.ys = y_stride;
  a.rstd = rstd;
  a.rows = rows;
  a.eps = eps;
  norm::fwd_entry<norm::Op::kRms>("rms_norm_fwd", a, cols, dt, stream);
}

void add_rms_norm_fwd(const void* x, int64_t x_stride, const void* r, int64_t r_stride, void* s,
                      int64_t s_stride, const void* w, void* y, int64_t y_stride, float* rstd,
                      int64_t rows, int64_t cols, float eps, DType dt, uintptr_t stream) {
  norm::FwdArgs a{};
  a.x = x;
  a.xs = x_stride;
  a.r = r;
  a.rs = r_stride;
  a.s = s;
  a.ss = s_stride;
  a.w = w;
  a.y = y;
  a.ys = y_stride;
  a.rstd = rstd;
  a.rows = rows;
  a.eps = eps;
  norm::fwd_entry<norm::Op::kAddRms>("add_rms_norm_fwd", a, cols, dt, stream);
}

void rms_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const float* rstd, const void* dextra, int64_t dextra_stride,
                  void* dx, int64_t dx_stride, float* dw, float* workspace, int64_t rows,
                  int64_t cols, DType dt, uintptr_t stream) {
  norm::BwdArgs a{};
  a.dy = dy;
  a.dys = dy_stride;
  a.x = x;
  a.xs = x_stride;
  a.w = w;
  a.rstd = rstd;
  a.dextra = dextra;
  a.des = dextra_stride;
  a.dx = dx;
  a.dxs = dx_stride;
  a.ws = workspace;
  a.rows = rows;
  norm::bwd_entry<false>("rms_norm_bwd", a, cols, dw, nullptr, dt, stream);
}

}  // namespace fastllm::cuda
