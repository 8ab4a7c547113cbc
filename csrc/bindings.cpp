// The only pybind11 file of fastllm._C: one m.def per kernel entry point, argument checks,
// and the CPU/CUDA split. Python (fastllm/ops/*) passes data pointers as integers, sizes,
// row strides in elements, dtype codes (common/dtype.h) and, for CUDA, the stream handle.
// Every check throws ValueError in Python; nothing here aborts the process.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

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
  fastllm::cpu::rms_norm_bwd(P(dy), dys, P(x), xs, P(w), P<float>(rstd), P(de), des, P(dx), dxs, P<float>(dw), rows,
                             cols, t);
}

void cpu_softmax_fwd(ptr_t x, int64_t xs, ptr_t y, int64_t ys, int64_t rows, int64_t cols, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("x", x, xs, rows, cols);
  check_row("y", y, ys, rows, cols);
  fastllm::cpu::softmax_fwd(P(x), xs, P(y), ys, rows, cols, t);
}

void cpu_softmax_bwd(ptr_t y, int64_t ys, ptr_t dy, int64_t dys, ptr_t dx, int64_t dxs, int64_t rows, int64_t cols,
                     int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("y", y, ys, rows, cols);
  check_row("dy", dy, dys, rows, cols);
  check_row("dx", dx, dxs, rows, cols);
  fastllm::cpu::softmax_bwd(P(y), ys, P(dy), dys, P(dx), dxs, rows, cols, t);
}

void cpu_silu_mul(ptr_t g, int64_t gs, ptr_t u, int64_t us, ptr_t y, int64_t ys, int64_t rows, int64_t cols, int dt) {
  DType t = check_dtype(dt);
  check_shape(rows, cols);
  check_row("gate", g, gs, rows, cols);
  check_row("up", u, us, rows, cols);
  check_row("y", y, ys, rows, cols);
  fastllm::cpu::silu_mul(P(g), gs, P(u), us, P(y), ys, rows, cols, t);
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
// exact: the caller vouches that every dequantised weight of the int4 formats, (u - 8) d or u d + m, is exact in
// fp32 with finite scales and mins (fastllm/ops/qmatmul.py's _exact_int4, cached per weight), which lets float
// mode factor the scales out at m = 1 (csrc/cpu/ops.h).
void cpu_qmatmul(ptr_t x, int64_t xs, ptr_t w, ptr_t scales, ptr_t mins, ptr_t bias, ptr_t y, int64_t ys,
                 int64_t m, int64_t n, int64_t k, int64_t group, int fmt, bool int8_act, bool exact, int dt) {
  DType t = check_dtype(dt);
  const auto f = check_qmatmul(x, xs, w, scales, mins, y, ys, m, n, k, group, fmt);
  fastllm::cpu::qmatmul(P(x), xs, P(w), P(scales), P<uint16_t>(mins), P(bias), P(y), ys, m, n, k, group, f, int8_act,
                        exact, t);
}

// ---- KV cache (generation) -------------------------------------------------------------------
using strides3 = std::array<int64_t, 3>;

void copy3(int64_t (&dst)[3], const strides3& src) { for (int i = 0; i < 3; ++i) dst[i] = src[i]; }

// Checks shared by decode_attention and kv_cache_append: sizes, head dim, GQA, int8 scales, the page.
void check_kv_cache(ptr_t k, ptr_t v, ptr_t k_scale, ptr_t v_scale, ptr_t seqlens, ptr_t block_table, int64_t page,
                    int64_t batch, int64_t hq, int64_t hkv, int64_t d, bool int8) {
  FASTLLM_CHECK(batch >= 0 && hq >= 0, "batch and query heads must be >= 0");
  FASTLLM_CHECK(hkv >= 1 && hq % hkv == 0, "kv heads must be >= 1 and divide the query heads, got " +
                                               std::to_string(hkv) + " and " + std::to_string(hq));
  FASTLLM_CHECK(d >= 1 && d <= fastllm::cpu::kMaxDecodeHeadDim,
                "head dim must be in [1, " + std::to_string(fastllm::cpu::kMaxDecodeHeadDim) + "], got " + std::to_string(d));
  FASTLLM_CHECK(k != 0 && v != 0 && seqlens != 0, "k_cache, v_cache and cache_seqlens must not be null pointers");
  FASTLLM_CHECK(!int8 || (k_scale != 0 && v_scale != 0), "an int8 cache needs k_scale and v_scale");
  FASTLLM_CHECK(block_table == 0 || page >= 1, "a paged cache needs page >= 1, got " + std::to_string(page));
}

void cpu_decode_attention(ptr_t q, strides3 qs, ptr_t k, strides3 ks, ptr_t v, strides3 vs, ptr_t k_scale,
                          strides3 kss, ptr_t v_scale, strides3 vss, ptr_t seqlens, ptr_t block_table, int64_t bt_stride,
                          int64_t page, ptr_t out, int64_t batch, int64_t lq, int64_t hq, int64_t hkv, int64_t d,
                          double scale, bool causal, bool int8, int dt, int64_t splits) {
  fastllm::cpu::DecodeAttnArgs a{};
  a.dt = check_dtype(dt);
  check_kv_cache(k, v, k_scale, v_scale, seqlens, block_table, page, batch, hq, hkv, d, int8);
  FASTLLM_CHECK(lq >= 0, "lq must be >= 0, got " + std::to_string(lq));
  FASTLLM_CHECK(splits >= 0, "splits must be >= 0 (0: chosen), got " + std::to_string(splits));
  FASTLLM_CHECK(batch * lq * hq == 0 || (q != 0 && out != 0), "q and out must not be null pointers");
  a.q = P(q), a.k = P(k), a.v = P(v), a.k_scale = P<float>(k_scale), a.v_scale = P<float>(v_scale);
  copy3(a.q_stride, qs), copy3(a.k_stride, ks), copy3(a.v_stride, vs), copy3(a.ks_stride, kss), copy3(a.vs_stride, vss);
  a.seqlens = P<int32_t>(seqlens), a.block_table = P<int32_t>(block_table), a.bt_stride = bt_stride, a.page = page;
  a.out = P(out), a.batch = batch, a.lq = lq, a.hq = hq, a.hkv = hkv, a.d = d;
  a.scale = float(scale), a.causal = causal, a.int8 = int8, a.splits = splits;
  fastllm::cpu::decode_attention(a);
}

void cpu_kv_cache_append(ptr_t k, strides3 ks, ptr_t v, strides3 vs, ptr_t k_scale, strides3 kss, ptr_t v_scale,
                         strides3 vss, ptr_t k_new, strides3 kns, ptr_t v_new, strides3 vns, ptr_t seqlens,
                         ptr_t block_table, int64_t bt_stride, int64_t page, ptr_t cos, ptr_t sin, int64_t cs_stride,
                         int64_t rot, ptr_t q, strides3 qs, ptr_t q_out, int64_t batch, int64_t lnew, int64_t hq,
                         int64_t hkv, int64_t d, bool int8, int dt) {
  fastllm::cpu::KVAppendArgs a{};
  a.dt = check_dtype(dt);
  check_kv_cache(k, v, k_scale, v_scale, seqlens, block_table, page, batch, q ? hq : hkv, hkv, d, int8);
  FASTLLM_CHECK(lnew >= 0, "lnew must be >= 0, got " + std::to_string(lnew));
  FASTLLM_CHECK(batch * lnew == 0 || (k_new != 0 && v_new != 0), "k_new and v_new must not be null pointers");
  FASTLLM_CHECK((cos == 0) == (sin == 0), "cos and sin must be given together");
  FASTLLM_CHECK(cos == 0 || (rot >= 2 && rot % 2 == 0 && rot <= d), "the rotary width must be even and in [2, D]");
  FASTLLM_CHECK(q == 0 || (cos != 0 && q_out != 0), "q is rotated only with cos/sin, into a q_out");
  a.k = P(k), a.v = P(v), a.k_scale = P<float>(k_scale), a.v_scale = P<float>(v_scale);
  a.k_new = P(k_new), a.v_new = P(v_new), a.q = P(q), a.q_out = P(q_out);
  copy3(a.k_stride, ks), copy3(a.v_stride, vs), copy3(a.ks_stride, kss), copy3(a.vs_stride, vss);
  copy3(a.kn_stride, kns), copy3(a.vn_stride, vns), copy3(a.q_stride, qs);
  a.seqlens = P<int32_t>(seqlens), a.block_table = P<int32_t>(block_table), a.bt_stride = bt_stride, a.page = page;
  a.cos = P<float>(cos), a.sin = P<float>(sin), a.cs_stride = cs_stride, a.rot = rot;
  a.batch = batch, a.lnew = lnew, a.hq = hq, a.hkv = hkv, a.d = d, a.int8 = int8;
  fastllm::cpu::kv_cache_append(a);
}

// ---- CPU graphs ------------------------------------------------------------------------------
// A CpuGraph holds CPU kernel calls recorded with their argument values (pointers included) and replays them
// in order from C++, with the GIL released once: what a CUDA graph does for launches, for the Python that
// issues a decode step's few hundred calls (fastllm/runtime/cpu_graph.py records them and keeps every tensor
// they point to alive). A call whose argument checks fail raises when it is recorded and is not recorded.
struct CpuGraph {
  std::vector<std::function<void()>> calls;
  std::vector<std::string> names;  // the op of each call

  // Replays the calls, returning each one's wall time in seconds (where a step's time goes).
  std::vector<double> replay_timed() {
    std::vector<double> t(calls.size());
    for (size_t i = 0; i < calls.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      calls[i]();
      t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return t;
  }
};

// Binds fn as cpu_<name>, and as record_cpu_<name>(graph, ...), which runs it and appends the call to graph.
template <typename... A>
void def_cpu(py::module_& m, const std::string& name, void (*fn)(A...)) {
  m.def(("cpu_" + name).c_str(), fn, py::call_guard<py::gil_scoped_release>());
  m.def(("record_cpu_" + name).c_str(), [fn, name](CpuGraph& g, A... a) {
          fn(a...);
          g.calls.emplace_back([fn, a...] { fn(a...); });
          g.names.push_back(name);
        }, py::call_guard<py::gil_scoped_release>());
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
  m.def("cpu_has_avx512_bf16", &fastllm::cpu_has_avx512_bf16, "CPU supports AVX-512 VNNI and AVX512_BF16");
  m.def("cpu_simd_level", &fastllm::cpu_simd_level,
        "SIMD level in use: 0 scalar, 1 avx2, 2 avx512, 3 avx512 with bf16 dot products");
  m.def("set_cpu_simd_max", &fastllm::set_cpu_simd_max, py::arg("level"),
        "cap the SIMD level (0 scalar, 1 avx2, 2 avx512, 3 avx512bf16: no cap); the tests run every path this way");
  m.def("set_cpu_simd_enabled", &fastllm::set_cpu_simd_enabled, py::arg("enabled"),
        "switch the SIMD paths off (False) to run the scalar paths, or back on");
  m.def("cpu_zmm_fma_gain", &fastllm::cpu_zmm_fma_gain,
        "float lanes a second of 16-lane FMAs over 8-lane ones on this core, measured once (0 without AVX-512)");
  m.def("cpu_zmm_float_gemm", &fastllm::cpu_zmm_float_gemm,
        "the float qmatmul GEMM (prefill) runs on 16-lane FMAs at the AVX-512 level (default: cpu_zmm_fma_gain >= 1.5)");
  m.def("set_cpu_zmm_float_gemm", &fastllm::set_cpu_zmm_float_gemm, py::arg("mode"),
        "force the 16-lane float qmatmul GEMM on (1) or off (0), or back to the default (-1); returns the mode replaced");

  m.def("advise_huge_pages", &fastllm::advise_huge_pages, py::arg("ptr"), py::arg("nbytes"),
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a fresh CPU buffer, before it is written");

  py::class_<CpuGraph>(m, "CpuGraph", "CPU kernel calls recorded by record_cpu_<op>, replayed in order")
      .def(py::init<>())
      .def("__len__", [](const CpuGraph& g) { return g.calls.size(); })
      .def("replay", [](CpuGraph& g) { for (auto& call : g.calls) call(); }, py::call_guard<py::gil_scoped_release>())
      .def("replay_timed", &CpuGraph::replay_timed, py::call_guard<py::gil_scoped_release>(),
           "replay, returning each call's wall time in seconds")
      .def_readonly("names", &CpuGraph::names, "the op of each recorded call");
  def_cpu(m, "layer_norm_fwd", &cpu_layer_norm_fwd);
  def_cpu(m, "layer_norm_bwd", &cpu_layer_norm_bwd);
  def_cpu(m, "rms_norm_fwd", &cpu_rms_norm_fwd);
  def_cpu(m, "add_rms_norm_fwd", &cpu_add_rms_norm_fwd);
  def_cpu(m, "rms_norm_bwd", &cpu_rms_norm_bwd);
  def_cpu(m, "softmax_fwd", &cpu_softmax_fwd);
  def_cpu(m, "softmax_bwd", &cpu_softmax_bwd);
  def_cpu(m, "silu_mul", &cpu_silu_mul);
  def_cpu(m, "qmatmul", &cpu_qmatmul);
  def_cpu(m, "decode_attention", &cpu_decode_attention);
  def_cpu(m, "kv_cache_append", &cpu_kv_cache_append);
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
