// CPU kernels of fastllm._C. All tensors are row-major 2-D views (rows, cols) whose
// inner stride is 1; *_stride is the distance between rows in elements. x/y/dy/dx use
// the element type `dt`; weight and bias use `dt` too; mean/rstd/dweight/dbias are fp32.
// Optional pointers may be nullptr. Each function has a scalar path and an AVX2/FMA
// path (files *_avx2.cpp, compiled with -mavx2 -mfma) chosen by cpu_use_avx2() (qmatmul also an
// AVX-512 VNNI path, qmatmul_avx512.cpp, chosen by cpu_use_avx512()), and
// parallelises over rows with OpenMP. Arguments are checked in bindings.cpp.
#pragma once
#include <cstdint>

#include "../common/dtype.h"
#include "../common/qformat.h"

namespace fastllm::cpu {

// y = (x - mean) * rstd * w + b, with mean/rstd over each row (biased variance, fp32).
// mean, rstd: (rows,) fp32 outputs (may be nullptr when not needed for backward).
void layer_norm_fwd(const void* x, int64_t x_stride, const void* w, const void* b, void* y,
                    int64_t y_stride, float* mean, float* rstd, int64_t rows, int64_t cols,
                    float eps, DType dt);

// xhat = (x - mean) * rstd, g = dy * w;
// dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat));
// dw[j] = sum_i dy * xhat, db[j] = sum_i dy (fp32, (cols,)); dx/dw/db may each be nullptr.
void layer_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                    const void* w, const float* mean, const float* rstd, void* dx,
                    int64_t dx_stride, float* dw, float* db, int64_t rows, int64_t cols, DType dt);

// y = x * rstd * w, rstd = 1 / sqrt(mean_j(x^2) + eps); rstd: (rows,) fp32 or nullptr.
void rms_norm_fwd(const void* x, int64_t x_stride, const void* w, void* y, int64_t y_stride,
                  float* rstd, int64_t rows, int64_t cols, float eps, DType dt);

// s = x + r (rounded to dt and written to s), then y = rms_norm(s) as above.
void add_rms_norm_fwd(const void* x, int64_t x_stride, const void* r, int64_t r_stride, void* s,
                      int64_t s_stride, const void* w, void* y, int64_t y_stride, float* rstd,
                      int64_t rows, int64_t cols, float eps, DType dt);

// xhat = x * rstd, g = dy * w; dx = rstd * (g - xhat * mean_j(g * xhat)) (+ dextra when given,
// the gradient flowing into the residual sum of add_rms_norm); dw[j] = sum_i dy * xhat.
void rms_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                  const void* w, const float* rstd, const void* dextra, int64_t dextra_stride,
                  void* dx, int64_t dx_stride, float* dw, int64_t rows, int64_t cols, DType dt);

// y = exp(x - max_j x) / sum_j exp(x - max_j x), fp32 accumulation.
void softmax_fwd(const void* x, int64_t x_stride, void* y, int64_t y_stride, int64_t rows,
                 int64_t cols, DType dt);

// dx = y * (dy - sum_j(dy * y)).
void softmax_bwd(const void* y, int64_t y_stride, const void* dy, int64_t dy_stride, void* dx,
                 int64_t dx_stride, int64_t rows, int64_t cols, DType dt);

// Packed weight formats of qmatmul: common/qformat.h.
using fastllm::QFormat;

// y = x @ W^T + bias, x: (m, k) of dt with row stride x_stride, y: (m, n) of dt with row stride
// y_stride, bias: (n,) of dt or nullptr. fp32 accumulation. int8_act: each row of x is first
// quantised per block of 32 (dx = max|x| / 127, qx = round_half_even(x * (127 / max|x|))) and the
// block dot products are integer (as fastllm/reference/qmatmul.py's quantize_activations).
// k is a multiple of 32 and of group.
void qmatmul(const void* x, int64_t x_stride, const void* w, const void* scales, const uint16_t* mins,
             const void* bias, void* y, int64_t y_stride, int64_t m, int64_t n, int64_t k, int64_t group,
             QFormat fmt, bool int8_act, DType dt);

}  // namespace fastllm::cpu
