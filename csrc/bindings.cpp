// The only pybind11 file of fastllm._C: one m.def per kernel entry point, argument checks,
// and the CPU/CUDA split. Python (fastllm/ops/*) passes data pointers as integers, sizes,
// row strides in elements, dtype codes (common/dtype.h) and, for CUDA, the stream handle.
// Every check throws ValueError in Python; nothing here aborts the process.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/check.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/memory.h"
#include "cpu/ops.h"
#if FASTLLM_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace py = pybind11;
using fastllm::DType;

namespace {

using ptr_t = uintptr_t;

template <typename T = void>
T* P(ptr_t p) { return reinterpret_cast<T*>(p); }

DType check_dtype(int code) {
  FASTLLM_CHECK(fastllm::valid_dtype(code), "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(code));
  return static_cast<DType>(code);
}

void check_shape(int64_t rows, int64_t cols) {
  FASTLLM_CHECK(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  FASTLLM_CHECK(cols >= 1, "cols must be >= 1, got " + std::to_string(cols));
}

void check_row(const char* name, ptr_t p, int64_t stride, int64_t rows, int64_t cols) {
  if (rows == 0) return;
  FASTLLM_CHECK(p != 0, std::string(name) + " must not be a null pointer");
  FASTLLM_CHECK(stride >= cols || rows == 1,
                std::string(name) + "_stride must be >= cols (" + std::to_string(cols) + "), got " + std::to_string(stride));
}

void check_ptr(const char* name, ptr_t p, int64_t rows) {
  if (rows == 0) return;
  FASTLLM_CHECK(p != 0, std::string(name) + " must not be a null pointer");
}

// ---- CPU -------------------------------------------------------------------------------------
void cpu_layer_norm_fwd(ptr_t x, int64_t xs, ptr_t w, ptr_t b, ptr_t y, int64_t ys, ptr_t mean, ptr_t rstd,
                        int64_t rows, int64_t cols, double eps, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  py::gil_scoped_release nogil;
  fastllm::cpu::layer_norm_fwd(P(x), xs, P(w), P(b), P(y), ys, P<float>(mean), P<float>(rstd), rows, cols, float(eps), t);
}

void cpu_layer_norm_bwd(ptr_t dy, int64_t dys, ptr_t x, int64_t xs, ptr_t w, ptr_t mean, ptr_t rstd, ptr_t dx,
                        int64_t dxs, ptr_t dw, ptr_t db, int64_t rows, int64_t cols, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("x", x, xs, rows, cols);
  check_ptr("mean", mean, rows);
  check_ptr("rstd", rstd, rows);
  if (dx) check_row("dx", dx, dxs, rows, cols);
  py::gil_scoped_release nogil;
  fastllm::cpu::layer_norm_bwd(P(dy), dys, P(x), xs, P(w), P<float>(mean), P<float>(rstd), P(dx), dxs, P<float>(dw),
                               P<float>(db), rows, cols, t);
}

void cpu_rms_norm_fwd(ptr_t x, int64_t xs, ptr_t w, ptr_t y, int64_t ys, ptr_t rstd, int64_t rows, int64_t cols,
                      double eps, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  py::gil_scoped_release nogil;
  fastllm::cpu::rms_norm_fwd(P(x), xs, P(w), P(y), ys, P<float>(rstd), rows, cols, float(eps), t);
}

void cpu_add_rms_norm_fwd(ptr_t x, int64_t xs, ptr_t r, int64_t rs, ptr_t s, int64_t ss, ptr_t w, ptr_t y,
                          int64_t ys, ptr_t rstd, int64_t rows, int64_t cols, double eps, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("residual", r, rs, rows, cols);
  check_row("sum", s, ss, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  py::gil_scoped_release nogil;
  fastllm::cpu::add_rms_norm_fwd(P(x), xs, P(r), rs, P(s), ss, P(w), P(y), ys, P<float>(rstd), rows, cols, float(eps), t);
}

void cpu_rms_norm_bwd(ptr_t dy, int64_t dys, ptr_t x, int64_t xs, ptr_t w, ptr_t rstd, ptr_t de, int64_t des,
                      ptr_t dx, int64_t dxs, ptr_t dw, int64_t rows, int64_t cols, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("x", x, xs, rows, cols);
  check_ptr("rstd", rstd, rows);
  if (de) check_row("dextra", de, des, rows, cols);
  if (dx) check_row("dx", dx, dxs, rows, cols);
  py::gil_scoped_release nogil;
  fastllm::cpu::rms_norm_bwd(P(dy), dys, P(x), xs, P(w), P<float>(rstd), P(de), des, P(dx), dxs, P<float>(dw), rows,
                             cols, t);
}

void cpu_softmax_fwd(ptr_t x, int64_t xs, ptr_t y, int64_t ys, int64_t rows, int64_t cols, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  py::gil_scoped_release nogil;
  fastllm::cpu::softmax_fwd(P(x), xs, P(y), ys, rows, cols, t);
}

void cpu_softmax_bwd(ptr_t y, int64_t ys, ptr_t dy, int64_t dys, ptr_t dx, int64_t dxs, int64_t rows, int64_t cols,
                     int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("y", y, ys, rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("dx", dx, dxs, rows, cols);
  py::gil_scoped_release nogil;
  fastllm::cpu::softmax_bwd(P(y), ys, P(dy), dys, P(dx), dxs, rows, cols, t);
}

// Checks shared by the CPU and CUDA qmatmul entry points; returns the format.
fastllm::QFormat check_qmatmul(ptr_t x, int64_t xs, ptr_t w, ptr_t scales, ptr_t mins, ptr_t y, int64_t ys, int64_t m,
                               int64_t n, int64_t k, int64_t group, int fmt) {
  using fastllm::QFormat;
  FASTLLM_CHECK(fmt >= 0 && fmt <= 3, "qformat code must be 0..3 (int8 per-channel, int8 group, int4, int4_asym), got " +
                                          std::to_string(fmt));
  const auto f = static_cast<QFormat>(fmt);
  FASTLLM_CHECK(m >= 0, "m must be >= 0, got " + std::to_string(m));
  FASTLLM_CHECK(n >= 1, "n must be >= 1, got " + std::to_string(n));
  FASTLLM_CHECK(k >= 32 && k % 32 == 0, "k must be a positive multiple of 32, got " + std::to_string(k));
  if (f == QFormat::I8Channel) {
    FASTLLM_CHECK(group == k, "group must equal k for per-channel int8, got " + std::to_string(group));
  } else {
    FASTLLM_CHECK((group == 32 || group == 64 || group == 128) && k % group == 0,
                  "group must be 32, 64 or 128 and divide k, got " + std::to_string(group));
  }
  check_row("x", x, xs, m, k);
  check_row("y", y, ys, m, n);
  FASTLLM_CHECK(w != 0 && scales != 0, "qweight data and scales must not be null pointers");
  FASTLLM_CHECK((mins != 0) == (f == QFormat::I4Asym), "mins must be given exactly for int4_asym");
  return f;
}

// y = x @ W^T + bias with W packed (common/qformat.h codes 0..3, fastllm/quant/formats.py).
void cpu_qmatmul(ptr_t x, int64_t xs, ptr_t w, ptr_t scales, ptr_t mins, ptr_t bias, ptr_t y, int64_t ys,
                 int64_t m, int64_t n, int64_t k, int64_t group, int fmt, bool int8_act, int dt) {
  DType t = check_dtype(dt);
  const auto f = check_qmatmul(x, xs, w, scales, mins, y, ys, m, n, k, group, fmt);
  py::gil_scoped_release nogil;
  fastllm::cpu::qmatmul(P(x), xs, P(w), P(scales), P<uint16_t>(mins), P(bias), P(y), ys, m, n, k, group, f, int8_act, t);
}

#if FASTLLM_WITH_CUDA
// ---- CUDA ------------------------------------------------------------------------------------
void cuda_layer_norm_fwd(ptr_t x, int64_t xs, ptr_t w, ptr_t b, ptr_t y, int64_t ys, ptr_t mean, ptr_t rstd,
                         int64_t rows, int64_t cols, double eps, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  fastllm::cuda::layer_norm_fwd(P(x), xs, P(w), P(b), P(y), ys, P<float>(mean), P<float>(rstd), rows, cols, float(eps), t,
                                stream);
}

void cuda_layer_norm_bwd(ptr_t dy, int64_t dys, ptr_t x, int64_t xs, ptr_t w, ptr_t mean, ptr_t rstd, ptr_t dx,
                         int64_t dxs, ptr_t dw, ptr_t db, ptr_t ws, int64_t rows, int64_t cols, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("x", x, xs, rows, cols);
  check_ptr("mean", mean, rows);
  check_ptr("rstd", rstd, rows);
  if (dx) check_row("dx", dx, dxs, rows, cols);
  if (dw || db) check_ptr("workspace", ws, rows);
  fastllm::cuda::layer_norm_bwd(P(dy), dys, P(x), xs, P(w), P<float>(mean), P<float>(rstd), P(dx), dxs, P<float>(dw),
                                P<float>(db), P<float>(ws), rows, cols, t, stream);
}

void cuda_rms_norm_fwd(ptr_t x, int64_t xs, ptr_t w, ptr_t y, int64_t ys, ptr_t rstd, int64_t rows, int64_t cols,
                       double eps, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  fastllm::cuda::rms_norm_fwd(P(x), xs, P(w), P(y), ys, P<float>(rstd), rows, cols, float(eps), t, stream);
}

void cuda_add_rms_norm_fwd(ptr_t x, int64_t xs, ptr_t r, int64_t rs, ptr_t s, int64_t ss, ptr_t w, ptr_t y,
                           int64_t ys, ptr_t rstd, int64_t rows, int64_t cols, double eps, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("residual", r, rs, rows, cols);
  check_row("sum", s, ss, rows, cols);
  check_row("y", y, ys, rows, cols);
  FASTLLM_CHECK(eps >= 0, "eps must be >= 0");
  fastllm::cuda::add_rms_norm_fwd(P(x), xs, P(r), rs, P(s), ss, P(w), P(y), ys, P<float>(rstd), rows, cols, float(eps),
                                  t, stream);
}

void cuda_rms_norm_bwd(ptr_t dy, int64_t dys, ptr_t x, int64_t xs, ptr_t w, ptr_t rstd, ptr_t de, int64_t des,
                       ptr_t dx, int64_t dxs, ptr_t dw, ptr_t ws, int64_t rows, int64_t cols, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("x", x, xs, rows, cols);
  check_ptr("rstd", rstd, rows);
  if (de) check_row("dextra", de, des, rows, cols);
  if (dx) check_row("dx", dx, dxs, rows, cols);
  if (dw) check_ptr("workspace", ws, rows);
  fastllm::cuda::rms_norm_bwd(P(dy), dys, P(x), xs, P(w), P<float>(rstd), P(de), des, P(dx), dxs, P<float>(dw),
                              P<float>(ws), rows, cols, t, stream);
}

// The quantised GEMV (float activations, m <= cuda::kQGemvMaxRows); same checks as cpu_qmatmul.
void cuda_qmatmul(ptr_t x, int64_t xs, ptr_t w, ptr_t scales, ptr_t mins, ptr_t bias, ptr_t y, int64_t ys, int64_t m,
                  int64_t n, int64_t k, int64_t group, int fmt, int dt, ptr_t stream) {
  DType t = check_dtype(dt);
  const auto f = check_qmatmul(x, xs, w, scales, mins, y, ys, m, n, k, group, fmt);
  FASTLLM_CHECK(m <= fastllm::cuda::kQGemvMaxRows, "m must be <= " + std::to_string(fastllm::cuda::kQGemvMaxRows) +
                                                       " for the CUDA qmatmul (GEMV), got " + std::to_string(m));
  FASTLLM_CHECK(w % 16 == 0, "qweight data must be 16-byte aligned (128-bit loads)");
  fastllm::cuda::qmatmul_gemv(P(x), xs, P(w), P(scales), P(mins), P(bias), P(y), ys, m, n, k, group, f, t, stream);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm C++/CUDA kernels (raw pointers + strides; see csrc/cpu/ops.h and csrc/cuda/ops.h)";
  m.attr("has_cuda") = bool(FASTLLM_WITH_CUDA);
#if FASTLLM_WITH_CUDA
  m.attr("no_cuda_reason") = "";
#else
  m.attr("no_cuda_reason") = FASTLLM_NO_CUDA_REASON;
#endif
  m.def("cpu_has_avx2_fma", &fastllm::cpu_has_avx2_fma, "CPU supports AVX2 and FMA");
  m.def("cpu_use_avx2", &fastllm::cpu_use_avx2, "the AVX2/FMA paths are in use");
  m.def("cpu_has_avx512_vnni", &fastllm::cpu_has_avx512_vnni, "CPU and OS support AVX-512 F/BW/VL/VNNI");
  m.def("cpu_simd_level", &fastllm::cpu_simd_level, "SIMD level in use: 0 scalar, 1 avx2, 2 avx512");
  m.def("set_cpu_simd_max", &fastllm::set_cpu_simd_max, py::arg("level"),
        "cap the SIMD level (0 scalar, 1 avx2, 2 avx512: no cap); the tests run every path this way");
  m.def("set_cpu_simd_enabled", &fastllm::set_cpu_simd_enabled, py::arg("enabled"),
        "switch the SIMD paths off (False) to run the scalar paths, or back on");

  m.def("advise_huge_pages", &fastllm::advise_huge_pages, py::arg("ptr"), py::arg("nbytes"),
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a fresh CPU buffer, before it is written");

  m.def("cpu_layer_norm_fwd", &cpu_layer_norm_fwd);
  m.def("cpu_layer_norm_bwd", &cpu_layer_norm_bwd);
  m.def("cpu_rms_norm_fwd", &cpu_rms_norm_fwd);
  m.def("cpu_add_rms_norm_fwd", &cpu_add_rms_norm_fwd);
  m.def("cpu_rms_norm_bwd", &cpu_rms_norm_bwd);
  m.def("cpu_softmax_fwd", &cpu_softmax_fwd);
  m.def("cpu_softmax_bwd", &cpu_softmax_bwd);
  m.def("cpu_qmatmul", &cpu_qmatmul);
#if FASTLLM_WITH_CUDA
  m.def("cuda_norm_bwd_workspace_floats", &fastllm::cuda::norm_bwd_workspace_floats);
  m.def("cuda_layer_norm_fwd", &cuda_layer_norm_fwd);
  m.def("cuda_layer_norm_bwd", &cuda_layer_norm_bwd);
  m.def("cuda_rms_norm_fwd", &cuda_rms_norm_fwd);
  m.def("cuda_add_rms_norm_fwd", &cuda_add_rms_norm_fwd);
  m.def("cuda_rms_norm_bwd", &cuda_rms_norm_bwd);
  m.def("cuda_qmatmul", &cuda_qmatmul);
  m.attr("cuda_qmatmul_max_m") = fastllm::cuda::kQGemvMaxRows;
#endif
}
