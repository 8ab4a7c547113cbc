// CUDA kernels of fastllm._C: the same math and pointer/stride contract as cpu/ops.h
// (2-D row-major views, inner stride 1, row strides in elements, fp32 statistics and
// weight gradients), plus the CUDA stream (a cudaStream_t passed as an integer) the
// kernels are launched on. Launches never synchronise the host. Pointers are device
// pointers on the current device. Failures to launch throw std::runtime_error.
#pragma once
#include <cstdint>

#include "../common/dtype.h"
#include "../common/qformat.h"

namespace fastllm::cuda {

// Number of fp32 elements of scratch memory the *_bwd functions need for their
// weight-gradient partial sums (the caller allocates it on the device).
int64_t norm_bwd_workspace_floats(int64_t rows, int64_t cols);

void layer_norm_fwd(const void* x, int64_t x_stride, const void* w, const void* b, void* y,
                    int64_t y_stride, float* mean, float* rstd, int64_t rows, int64_t cols,
                    float eps, DType dt, uintptr_t stream);

void layer_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                    const void* w, const float* mean, const float* rstd, void* dx,
                    int64_t dx_stride, float* dw, float* db, float* workspace, int64_t rows,
                    int64_t cols, DType dt, uintptr_t stream);

void rms_norm_fwd(const void* x, int64_t x_stride, const void* w, void* y, int64_t y_stride,
                  float* rstd, int64_t rows, int64_t cols, float eps, DType dt, uintptr_t stream);

void add_rms_norm_fwd(const void* x, int64_t x_stride, const void* r, int64_t r_stride, void* s,
                      int64_t s_stride, const void* w, void* y, int64_t y_stride, float* rstd,
                      int64_t rows, int64_t cols, float eps, DType dt, uintptr_t stream);

void rms_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const float* rstd, const void* dextra, int64_t dextra_stride,
                  void* dx, int64_t dx_stride, float* dw, float* workspace, int64_t rows,
                  int64_t cols, DType dt, uintptr_t stream);

// Rows of x the quantised GEMV takes (larger M needs a tensor-core GEMM, not written yet).
constexpr int64_t kQGemvMaxRows = 8;

// y = x @ W^T + bias for m <= kQGemvMaxRows rows of x, W packed in format `fmt` (common/qformat.h):
// x: (m, k) of dt with row stride x_stride, y: (m, n) of dt with row stride y_stride, bias: (n,)
// of dt or nullptr; scales/mins as the format says (mins nullptr unless I4Asym). fp32
// accumulation, the weights dequantised exactly (cpu/ops.h qmatmul's float mode). k is a multiple
// of 32 and of group (group == k for I8Channel); w must be 16-byte aligned.
void qmatmul_gemv(const void* x, int64_t x_stride, const void* w, const void* scales, const void* mins,
                  const void* bias, void* y, int64_t y_stride, int64_t m, int64_t n, int64_t k, int64_t group,
                  QFormat fmt, DType dt, uintptr_t stream);

}  // namespace fastllm::cuda
