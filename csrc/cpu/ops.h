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

// SwiGLU's gate: y = silu(g) * u = g / (1 + exp(-g)) * u, elementwise, fp32 arithmetic, rounded once.
void silu_mul(const void* g, int64_t g_stride, const void* u, int64_t u_stride, void* y, int64_t y_stride,
              int64_t rows, int64_t cols, DType dt);

// Packed weight formats of qmatmul: common/qformat.h.
using fastllm::QFormat;

// y = x @ W^T + bias, x: (m, k) of dt with row stride x_stride, y: (m, n) of dt with row stride
// y_stride, bias: (n,) of dt or nullptr. fp32 accumulation. int8_act: each row of x is first
// quantised per block of 32 (dx = max|x| / 127, qx = round_half_even(x * (127 / max|x|))) and the
// block dot products are integer (as fastllm/reference/qmatmul.py's quantize_activations).
// k is a multiple of 32 and of group. exact (int4 formats): every dequantised weight (u - 8) d or u d + m is exact
// in fp32 and the scales and mins are finite, as the caller has checked; then float mode at m = 1 may take the
// block sums of the unscaled (u - 8) (qmatmul_m1_avx512.cpp's rows_digits_m1), which gives the same dot products.
void qmatmul(const void* x, int64_t x_stride, const void* w, const void* scales, const uint16_t* mins,
             const void* bias, void* y, int64_t y_stride, int64_t m, int64_t n, int64_t k, int64_t group,
             QFormat fmt, bool int8_act, bool exact, DType dt);

// ---- KV cache (generation): fastllm/reference/decode_attention.py has the math ----
// Strides are in elements, three per tensor for its first three dims (the last dim is contiguous).
// The cache is contiguous (block_table == nullptr: block = sequence, page unused) or paged (block_table
// (B, *) int32 with row stride bt_stride, page = positions per block); int8 caches come with fp32 scales of
// shape cache.shape[:3]; every other tensor has dtype dt.
constexpr int64_t kMaxDecodeHeadDim = 256;

// out (B, Lq, Hq, D) contiguous = attention of q (B, Lq, Hq, D) to the first seqlens[b] positions of
// sequence b (query i at position seqlens[b] - Lq + i; causal: bottom-right aligned). Hkv divides Hq.
struct DecodeAttnArgs {
  const void* q; int64_t q_stride[3];
  const void* k; int64_t k_stride[3];
  const void* v; int64_t v_stride[3];
  const float* k_scale; int64_t ks_stride[3];
  const float* v_scale; int64_t vs_stride[3];
  const int32_t* seqlens;
  const int32_t* block_table; int64_t bt_stride; int64_t page;
  void* out;
  int64_t batch, lq, hq, hkv, d;
  float scale;
  bool causal, int8;
  DType dt;
  int64_t splits;  // key ranges per sequence (at most the longest length); 0: chosen from batch, length, threads
};
void decode_attention(const DecodeAttnArgs& a);

// Writes k_new, v_new (B, Lnew, Hkv, D) at positions seqlens[b] + t of the cache; with cos/sin (max_pos, R)
// fp32 tables (row stride cs_stride) the first R features of the keys are rotated first ("rotate half", fp32),
// and q (B, Lnew, Hq, D), if given, is rotated likewise into q_out (contiguous). int8 caches: per (position,
// kv head) scale = max|x| / 127, code = sign(x) floor(|x| / scale + 1/2).
struct KVAppendArgs {
  void* k; int64_t k_stride[3];
  void* v; int64_t v_stride[3];
  float* k_scale; int64_t ks_stride[3];
  float* v_scale; int64_t vs_stride[3];
  const void* k_new; int64_t kn_stride[3];
  const void* v_new; int64_t vn_stride[3];
  const int32_t* seqlens;
  const int32_t* block_table; int64_t bt_stride; int64_t page;
  const float* cos; const float* sin; int64_t cs_stride; int64_t rot;
  const void* q; int64_t q_stride[3];
  void* q_out;
  int64_t batch, lnew, hq, hkv, d;
  bool int8;
  DType dt;
};
void kv_cache_append(const KVAppendArgs& a);

}  // namespace fastllm::cpu
