// Standalone GPU test + benchmark of the CUDA quantised GEMV (cuda/ops.h qmatmul_gemv; no Python,
// no torch).
// SOURCES: csrc/cuda/qmatmul_gemv.cu
//
// Build and run from the repository root (H100: sm_90; add -gencode for other GPUs):
//   mkdir -p build && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 \
//     -I csrc tests/cuda/test_qmatmul_standalone.cu csrc/cuda/qmatmul_gemv.cu \
//     -o build/test_qmatmul_standalone && ./build/test_qmatmul_standalone
// Options: --no-bench (correctness only), --bench-only. Out-of-bounds accesses:
//   compute-sanitizer --tool memcheck ./build/test_qmatmul_standalone --no-bench
//
// Correctness: random packed weights (every byte value, random fp16 scales and mins, fp32 scales
// for per-channel int8) in the four formats of common/qformat.h and group sizes 32/64/128, x and
// bias in fp32/fp16/bf16, M = 1..8, N around the 16-channel block size, K over one, two and three
// K tiles of 1024; x with a padded row stride, y with a padded row stride whose padding holds a
// sentinel that must survive. The host reference decodes the "rows" layout from its description
// in fastllm/quant/formats.py (written independently of the kernel's bit tricks) and sums in
// float64 from the dtype-rounded x. Tolerance per output: half an ulp of the output dtype relative
// (the final rounding) + 1e-5 * sum_k |x_k w_k| (fp32 accumulation over K <= 3200). Prints the
// worst error in units of the tolerance per format/dtype and PASS/FAIL; exit code 1 on failure.
// Benchmark: bf16 x, int4 (group 128) and int8 (per-channel), M in {1, 8}, (K, N) in {(4096,
// 4096), (4096, 14336), (8192, 28672)}: GB/s of packed weight + scales read once, next to a
// device-to-device cudaMemcpy of the same bytes (the bandwidth ceiling).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/qformat.h"
#include "cuda/ops.h"
#include "standalone.cuh"

using fastllm::DType;
using fastllm::QFormat;


// A device buffer mirrored by a host vector of bytes.
struct Buf {
  std::vector<unsigned char> h;
  void* d = nullptr;
  explicit Buf(size_t bytes, unsigned char fill = 0) : h(bytes ? bytes : 1, fill) { CK(cudaMalloc(&d, h.size())); }
  ~Buf() { cudaFree(d); }
  Buf(const Buf&) = delete;
  void up() { CK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice)); }
  void down() { CK(cudaMemcpy(h.data(), d, h.size(), cudaMemcpyDeviceToHost)); }
};

const char* fmt_name(QFormat f) {
  switch (f) {
    case QFormat::I8Channel: return "int8/channel";
    case QFormat::I8Group: return "int8/group";
    case QFormat::I4: return "int4";
    case QFormat::I4Asym: return "int4_asym";
  }
  return "?";
}
bool is_int4(QFormat f) { return f == QFormat::I4 || f == QFormat::I4Asym; }

// A random packed weight (n, k) in format f with group g, and its float64 decoding W[n][k].
struct QWeight {
  QFormat f;
  int64_t n, k, g;
  Buf data, scales, mins;
  std::vector<double> w;
  QWeight(QFormat f_, int64_t n_, int64_t k_, int64_t g_, std::mt19937_64& rng)
      : f(f_), n(n_), k(k_), g(g_), data(size_t(n_ * (is_int4(f_) ? k_ / 2 : k_))),
        scales(size_t(n_ * (k_ / g_) * (f_ == QFormat::I8Channel ? 4 : 2))),
        mins(f_ == QFormat::I4Asym ? size_t(n_ * (k_ / g_) * 2) : 0), w(size_t(n_ * k_)) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& b : data.h) b = static_cast<unsigned char>(byte(rng));
    if (!is_int4(f))
      for (auto& b : data.h)
        if (b == 0x80) b = 0x81;  // int8 codes are in [-127, 127]
    const int64_t ng = k / g;
    std::vector<double> d(size_t(n * ng)), m(size_t(n * ng), 0.0);
    for (int64_t i = 0; i < n * ng; ++i) {
      const float s = 0.02f * nd(rng);
      if (f == QFormat::I8Channel) {
        std::memcpy(&scales.h[size_t(i) * 4], &s, 4);
        d[i] = s;
      } else {
        const uint16_t hs = fastllm::float_to_half(s);
        std::memcpy(&scales.h[size_t(i) * 2], &hs, 2);
        d[i] = fastllm::half_to_float(hs);
      }
      if (f == QFormat::I4Asym) {
        const uint16_t hm = fastllm::float_to_half(-0.1f * std::fabs(nd(rng)));
        std::memcpy(&mins.h[size_t(i) * 2], &hm, 2);
        m[i] = fastllm::half_to_float(hm);
      }
    }
    // Decoding, as formats.py states it: int8 element k of row r at byte r * K + k; int4 row r is
    // K / 32 blocks of 16 bytes, byte i of block b holds element 32 b + i (low nibble) and
    // 32 b + 16 + i (high nibble).
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        double v;
        if (is_int4(f)) {
          const int64_t b = j / 32, i = j % 32;
          const unsigned char byte_ = data.h[size_t(r * (k / 2) + b * 16 + i % 16)];
          v = i < 16 ? (byte_ & 0xF) : (byte_ >> 4);
        } else {
          v = static_cast<signed char>(data.h[size_t(r * k + j)]);
        }
        const double dd = d[size_t(r * ng + j / g)], mm = m[size_t(r * ng + j / g)];
        w[size_t(r * k + j)] = f == QFormat::I4 ? (v - 8) * dd : (f == QFormat::I4Asym ? v * dd + mm : v * dd);
      }
    }
    data.up();
    scales.up();
    if (f == QFormat::I4Asym) mins.up();
  }
  size_t bytes() const { return data.h.size() + scales.h.size() + (f == QFormat::I4Asym ? mins.h.size() : 0); }
  void* mins_ptr() const { return f == QFormat::I4Asym ? mins.d : nullptr; }
};

int g_fail = 0;
double ulp_half(DType t) { return t == DType::F32 ? 0x1p-24 : (t == DType::F16 ? 0x1p-11 : 0x1p-8); }

// One GEMV call against the float64 reference; returns the worst error / tolerance.
double run_case(const QWeight& q, DType t, int64_t m, bool with_bias, std::mt19937_64& rng) {
  const int64_t n = q.n, k = q.k, xs = k + 8, ys = n + 3;
  const size_t es = size_t(fastllm::dtype_size(t));
  Buf x(size_t(m * xs) * es), y(size_t(m * ys) * es, 0xA5), bias(size_t(n) * es);
  std::normal_distribution<float> nd(0.3f, 1.0f);
  for (int64_t i = 0; i < m * xs; ++i) fastllm::store_from_float(x.h.data(), i, nd(rng), t);
  for (int64_t i = 0; i < n; ++i) fastllm::store_from_float(bias.h.data(), i, nd(rng), t);
  x.up();
  bias.up();
  y.up();
  fastllm::cuda::qmatmul_gemv(x.d, xs, q.data.d, q.scales.d, q.mins_ptr(), with_bias ? bias.d : nullptr, y.d, ys, m, n,
                              k, q.g, q.f, t, 0);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  y.down();
  double worst = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < ys; ++c) {
      if (c >= n) {  // row padding: untouched
        for (size_t b = 0; b < es; ++b)
          if (y.h[size_t(r * ys + c) * es + b] != 0xA5) worst = INFINITY;  // a stray write
        continue;
      }
      double ref = with_bias ? fastllm::load_as_float(bias.h.data(), c, t) : 0.0, mag = 0;
      for (int64_t j = 0; j < k; ++j) {
        const double p = fastllm::load_as_float(x.h.data(), r * xs + j, t) * q.w[size_t(c * k + j)];
        ref += p;
        mag += std::fabs(p);
      }
      const double got = fastllm::load_as_float(y.h.data(), r * ys + c, t);
      const double tol = ulp_half(t) * std::fabs(ref) + 1e-5 * mag + 1e-30;
      const double e = std::fabs(got - ref) / tol;
      if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;  // NaN counts as infinitely wrong
    }
  }
  return worst;
}

void test_all() {
  std::mt19937_64 rng(1234);
  const QFormat fmts[] = {QFormat::I8Channel, QFormat::I8Group, QFormat::I4, QFormat::I4Asym};
  const DType dts[] = {DType::F32, DType::F16, DType::BF16};
  for (QFormat f : fmts) {
    for (int64_t g : {32, 64, 128}) {
      if (f == QFormat::I8Channel && g != 32) continue;
      for (int64_t k : {128, 1152, 3200}) {  // 1 tile, 2 tiles, 4 tiles (the last ones partial)
        if (k % g) continue;
        const int64_t gk = f == QFormat::I8Channel ? k : g;
        for (int64_t n : {1, 16, 37}) {
          QWeight q(f, n, k, gk, rng);
          for (DType t : dts) {
            double worst = 0;
            for (int64_t m = 1; m <= fastllm::cuda::kQGemvMaxRows; ++m)
              worst = std::fmax(worst, run_case(q, t, m, (m + n) % 2 == 1, rng));
            const bool ok = worst <= 1.0;
            g_fail += !ok;
            std::printf("%s %-12s g=%-4lld k=%-5lld n=%-3lld %-8s worst err %.3f x tol\n", ok ? "PASS" : "FAIL",
                        fmt_name(f), (long long)gk, (long long)k, (long long)n, fastllm::dtype_name(t), worst);
          }
        }
      }
    }
  }
}

// ------------------------------------------- benchmark -------------------------------------------

void bench() {
  std::mt19937_64 rng(7);
  const int64_t shapes[][2] = {{4096, 4096}, {4096, 14336}, {8192, 28672}};  // (K, N)
  for (const auto& shape : shapes) {
    const int64_t k = shape[0], n = shape[1];
    for (QFormat f : {QFormat::I4, QFormat::I8Channel}) {
      QWeight q(f, n, k, f == QFormat::I4 ? 128 : k, rng);
      Buf copy(q.bytes());
      const float mc = time_ms([&] { CK(cudaMemcpyAsync(copy.d, q.data.d, q.data.h.size(), cudaMemcpyDeviceToDevice)); },
                               50);
      for (int64_t m : {1, 8}) {
        Buf x(size_t(m * k) * 2), y(size_t(m * n) * 2);
        const float ms = time_ms([&] {
          fastllm::cuda::qmatmul_gemv(x.d, k, q.data.d, q.scales.d, q.mins_ptr(), nullptr, y.d, n, m, n, k, q.g, q.f,
                                      DType::BF16, 0);
        }, 50);
        std::printf("bench %-12s M=%lld K=%-5lld N=%-5lld bf16: %8.2f us %7.1f GB/s   (memcpy of the packed data: "
                    "%7.1f GB/s read+write)\n",
                    fmt_name(f), (long long)m, (long long)k, (long long)n, ms * 1e3, q.bytes() / (ms * 1e6),
                    2.0 * q.data.h.size() / (mc * 1e6));
      }
    }
  }
}

int main(int argc, char** argv) {
  bool do_test = true, do_bench = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-bench")) do_bench = false;
    if (!std::strcmp(argv[i], "--bench-only")) do_test = false;
  }
  if (do_test) test_all();
  if (do_bench) bench();
  if (do_test) std::printf("%s (%d failing configurations)\n", g_fail ? "FAILED" : "ALL PASSED", g_fail);
  return g_fail ? 1 : 0;
}
