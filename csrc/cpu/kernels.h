// Private to csrc/cpu: argument bundles shared by the scalar and SIMD paths, the AVX2 and AVX-512
// entry points (defined in *_avx2.cpp / *_avx512.cpp), element storage types, dtype/flag dispatch,
// and the fixed row partition that makes the column reductions of the backward passes deterministic.
//
// Everything defined here (not just declared) has internal linkage, so a copy compiled into an
// *_avx2.cpp (or *_avx512.cpp) file with -mavx2 can never be chosen by the linker for a scalar file.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/dtype.h"
#include "ops.h"

namespace fastllm::cpu {

// layer_norm_fwd, rms_norm_fwd and add_rms_norm_fwd (r/s are set only for add_rms_norm; b and
// mean only for layer_norm). Pointers other than x/y may be nullptr.
struct NormFwdArgs {
  const void* x; int64_t x_stride;
  const void* r; int64_t r_stride;
  void* s; int64_t s_stride;
  const void* w; const void* b;
  void* y; int64_t y_stride;
  float* mean; float* rstd;
  int64_t rows, cols;
  float eps;
  DType dt;
};

// layer_norm_bwd and rms_norm_bwd (mean only for layer_norm, dextra only for rms_norm).
// part: nullptr, or nchunks zero-filled blocks of nparts * cols floats; chunk c (the rows
// chunk_begin(c) .. chunk_begin(c + 1)) adds its rows' dy * xhat to block c [0, cols) and, for
// layer_norm, its dy to [cols, 2 * cols). The caller sums the blocks in chunk order.
struct NormBwdArgs {
  const void* dy; int64_t dy_stride;
  const void* x; int64_t x_stride;
  const void* w;
  const float* mean; const float* rstd;
  const void* dextra; int64_t dextra_stride;
  void* dx; int64_t dx_stride;
  float* part; int64_t nchunks;
  int64_t rows, cols;
  DType dt;
};

// Two inputs and one output, row by row. softmax_fwd: a = x, out = y.  softmax_bwd: a = y, b = dy,
// out = dx.  silu_mul: a = gate, b = up, out = y.
struct RowArgs {
  const void* a; int64_t a_stride;
  const void* b; int64_t b_stride;
  void* out; int64_t out_stride;
  int64_t rows, cols;
  DType dt;
};

// qmatmul after the activations were prepared (qmatmul.cpp): float mode reads xf (m rows of k
// floats, row stride xf_stride); int8 mode reads qx (m x k int8, dense), dx (m x k/32 block
// scales) and, for I4Asym, sx (m x k/group: sum over the group's blocks of dx * sum(qx)).
// The kernels write y (m x n of dt, plus bias).
struct QMatmulArgs {
  const float* xf; int64_t xf_stride;  // (xf_stride is also xbf's row stride)
  // x as it is, bfloat16, instead of xf (float mode, int4 weights, AVX512_BF16 CPUs)
  const uint16_t* xbf;
  const int8_t* qx; const float* dx; const float* sx;
  const void* w; const void* scales; const uint16_t* mins;
  const void* bias; void* y; int64_t y_stride;
  int64_t m, n, k, group;
  QFormat fmt; bool int8_act; DType dt;
  bool exact;  // int4 weights exact in fp32 with finite scales (ops.h's qmatmul)
};

namespace avx2 {  // rows >= 1 in all of these
void layer_norm_fwd(const NormFwdArgs& a);
void layer_norm_bwd(const NormBwdArgs& a);
void rms_norm_fwd(const NormFwdArgs& a);  // add_rms_norm when a.r != nullptr
void rms_norm_bwd(const NormBwdArgs& a);
void softmax_fwd(const RowArgs& a);
void softmax_bwd(const RowArgs& a);
void silu_mul(const RowArgs& a);
void qmatmul(const QMatmulArgs& a);
void decode_attention(const DecodeAttnArgs& a);
// Float activations from this many rows of x on run the register-blocked GEMM (qmatmul_gemm_avx2.cpp)
// instead of the row passes (which read a dequantised weight row once per 8 rows of x). On one Zen 4
// core (SmolLM2's 576 x 3072, 576 x 960, 1536 x 576, 576 x 576 and 4096 x 4096; int4, int4_asym, int8)
// the GEMM is 0.7-1.2x the row passes at 9-10 rows (its 16-row panel is mostly padding), 0.95-1.4x
// at 11, 1.0-1.8x at 12 and 1.9-2.3x at 128.
constexpr int64_t kGemmMinM = 11;
}  // namespace avx2

namespace avx512 {  // *_avx512.cpp, chosen by cpu_use_avx512()
void qmatmul(const QMatmulArgs& a);
// Float mode from avx2::kGemmMinM rows of x on, where cpu_zmm_float_gemm(): the GEMM of qmatmul_gemm_float.h on
// 16-lane vectors (qmatmul_gemm_float_avx512.cpp).
void gemm_float(const QMatmulArgs& a);
// Int8 activations from this many rows of x on run the VNNI GEMM (qmatmul_gemm_int8_avx512.cpp): on
// one Zen 4 core 0.6-1.1x the row-pass path at 8 rows, 1.2-1.4x at 12, 1.5-2.2x at 16, 3.4-4.8x at 128.
constexpr int64_t kGemmInt8MinM = 12;
// Bfloat16 activations (float mode, int4 weights, AVX512_BF16 CPUs) from this many rows of x on run the
// vdpbf16ps GEMM (qmatmul_gemm_avx512bf16.cpp), fewer the register tiles of qmatmul_rows_avx512bf16.cpp.
// The GEMM's panels have 16 rows, so it takes about as long at 9 rows as at 16, where the tiles' time grows
// with the rows. On a 2-core Zen 4 (int4_asym) the tiles were 1.3x faster than the GEMM at 4096 x 4096 up to
// 12 rows, the GEMM 1.2-1.6x faster than the tiles on SmolLM2's 3072 x 576 and 576 x 1536 from 12 rows.
constexpr int64_t kGemmBf16MinM = 12;
// qmatmul.cpp's int8-mode block quantisation (32 floats -> q, d, sum of q), bit-identical to it
void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum);
}  // namespace avx512

namespace {

// Below this many elements a call runs on one thread (an OpenMP fork costs more than the work).
constexpr int64_t kParallelMinElems = int64_t(1) << 15;

template <DType D>
using storage_t = std::conditional_t<D == DType::F32, float, uint16_t>;

template <DType D>
inline const storage_t<D>* row_ptr(const void* p, int64_t stride, int64_t i) {
  return static_cast<const storage_t<D>*>(p) + i * stride;
}

template <DType D>
inline storage_t<D>* row_ptr(void* p, int64_t stride, int64_t i) {
  return static_cast<storage_t<D>*>(p) + i * stride;
}

// f(std::integral_constant<DType, dt>{}): the dtype switch happens once per call.
template <typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(std::integral_constant<DType, DType::F32>{}); break;
    case DType::F16: f(std::integral_constant<DType, DType::F16>{}); break;
    case DType::BF16: f(std::integral_constant<DType, DType::BF16>{}); break;
  }
}

template <typename F>
inline void dispatch_bool(bool v, F&& f) {
  if (v) f(std::true_type{}); else f(std::false_type{});
}

// Number of row chunks of a backward pass: one per OpenMP thread (one for small problems).
// Fixed before the parallel region, so the summation order never depends on thread timing.
inline int64_t num_chunks(int64_t rows, int64_t cols) {
  if (rows * cols < kParallelMinElems) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(rows, omp_get_max_threads()));
}

// qmatmul: rows of x handled together per pass over a weight row (the row stays in L1 between
// passes, so the weights are read from memory once for any m).
constexpr int kQRows = 8;

// f(std::integral_constant<int, mt>) for mt in [1, Max] (mt outside: the nearest end).
template <int Max, int N = 1, typename F>
inline void dispatch_upto(int mt, F&& f) {
  if constexpr (N == Max) f(std::integral_constant<int, N>{});
  else if (mt <= N) f(std::integral_constant<int, N>{});
  else dispatch_upto<Max, N + 1>(mt, f);
}

template <typename F>
inline void dispatch_rows(int mt, F&& f) {  // mt in [1, kQRows]
  dispatch_upto<kQRows>(mt, f);
}

template <QFormat F>
constexpr bool kInt4 = F == QFormat::I4 || F == QFormat::I4Asym;

template <typename F>
inline void dispatch_qformat(QFormat q, F&& f) {
  switch (q) {
    case QFormat::I8Channel: f(std::integral_constant<QFormat, QFormat::I8Channel>{}); break;
    case QFormat::I8Group: f(std::integral_constant<QFormat, QFormat::I8Group>{}); break;
    case QFormat::I4: f(std::integral_constant<QFormat, QFormat::I4>{}); break;
    case QFormat::I4Asym: f(std::integral_constant<QFormat, QFormat::I4Asym>{}); break;
  }
}

// Writes y[m0 + i][j] = out[i] + bias[j] (rounded once to dt) for i < mt.
inline void store_outputs(const QMatmulArgs& a, int64_t m0, int mt, int64_t j, const float* out) {
  const float b = a.bias ? load_as_float(a.bias, j, a.dt) : 0.0f;
  for (int i = 0; i < mt; ++i)
    store_from_float(static_cast<char*>(a.y) + (m0 + i) * a.y_stride * dtype_size(a.dt), j, out[i] + b, a.dt);
}

inline int64_t chunk_begin(int64_t rows, int64_t nchunks, int64_t c) { return rows * c / nchunks; }

// out[j] = sum over c = 0 .. nchunks-1 (in that order) of part[c * stride + j].
inline void reduce_chunks(const float* part, int64_t nchunks, int64_t stride, int64_t cols, float* out) {
  std::copy(part, part + cols, out);
  for (int64_t c = 1; c < nchunks; ++c) {
    const float* p = part + c * stride;
    for (int64_t j = 0; j < cols; ++j) out[j] += p[j];
  }
}

// ---- scalar-path helpers (used by the plain .cpp files only) ----

template <DType D>
inline float to_float(storage_t<D> v) {
  if constexpr (D == DType::F32) return v;
  else if constexpr (D == DType::F16) return half_to_float(v);
  else return bf16_to_float(v);
}

template <DType D>
inline storage_t<D> from_float(float v) {
  if constexpr (D == DType::F32) return v;
  else if constexpr (D == DType::F16) return float_to_half(v);
  else return float_to_bf16(v);
}

// sum_{j < n} f(j) in fp32: blocks of 1024 terms, each summed with 8 interleaved partial sums
// (as the AVX2 paths do with 8-lane vectors), then the block sums are added. Keeps long rows
// accurate and lets the compiler vectorise.
template <typename F>
inline float lane_sum(int64_t n, F&& f) {
  constexpr int kLanes = 8;
  constexpr int64_t kBlock = 1024;
  float total = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t end = std::min(n, j0 + kBlock);
    float acc[kLanes] = {};
    int64_t j = j0;
    for (; j + kLanes <= end; j += kLanes)
      for (int k = 0; k < kLanes; ++k) acc[k] += f(j + k);
    for (int k = 0; j < end; ++j, ++k) acc[k] += f(j);
    total += ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  }
  return total;
}

}  // namespace
}  // namespace fastllm::cpu
