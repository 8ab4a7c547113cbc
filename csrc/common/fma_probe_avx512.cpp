// How many more float lanes a second this core's 16-lane FMAs give than its 8-lane ones (cpu_features.h,
// cpu_zmm_fma_gain): compiled with the AVX-512 flags (*_avx512.cpp), called only where cpu_has_avx512_vnni().
// About 2 where a core issues two 512-bit FMAs a cycle (Intel Xeon), about 1 where it splits them into 256-bit
// halves (Zen 4) or has one 512-bit port (some Intel client and Xeon Silver cores).
#include <immintrin.h>

#include <algorithm>
#include <chrono>

#include "cpu_features.h"

namespace fastllm {
namespace {

// Seconds for steps x kChains independent FMAs on vectors V (kChains chains hide the latency on two ports).
// half_of(v): v in every lane (of a volatile 0.5: no constant folding); first(v): lane 0 (the chains must run).
template <class Half, class Fma, class First>
double fma_seconds(Half half_of, Fma fma, First first, int steps) {
  constexpr int kChains = 16;
  volatile float h = 0.5f;
  const auto half = half_of(h);
  decltype(half_of(h)) acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = half_of(h + 0.01f * i);  // (distinct: equal chains would merge)
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = fma(acc[i], half, half);  // (x + 1) / 2: stays in [0.5, 1]
  }
#pragma GCC unroll 16
  for (int i = 1; i < kChains; ++i) acc[0] = fma(acc[0], half, acc[i]);
  volatile float sink = first(acc[0]);
  const auto t1 = std::chrono::steady_clock::now();
  (void)sink;
  return std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

double measure_zmm_fma_gain() {
  const auto y_set = [](float v) { return _mm256_set1_ps(v); };
  const auto y_fma = [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); };
  const auto y_first = [](__m256 v) { return _mm256_cvtss_f32(v); };
  const auto z_set = [](float v) { return _mm512_set1_ps(v); };
  const auto z_fma = [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); };
  const auto z_first = [](__m512 v) { return _mm512_cvtss_f32(v); };
  // Intel cores run 512-bit instructions at a reduced rate for some tens of microseconds after their first use
  // (2048-step runs measured 1.4 where the steady state is 1.9): a warm-up run first (about 0.1 ms), then the best
  // of 5 interleaved runs of each width (about 25 us each; 0.4 ms in all, once per process).
  fma_seconds(z_set, z_fma, z_first, 32768);
  double ymm = 1e30, zmm = 1e30;
  for (int r = 0; r < 5; ++r) {
    ymm = std::min(ymm, fma_seconds(y_set, y_fma, y_first, 8192));
    zmm = std::min(zmm, fma_seconds(z_set, z_fma, z_first, 8192));
  }
  return ymm > 0.0 && zmm > 0.0 ? 2.0 * ymm / zmm : 1.0;  // (a clock too coarse to time them: no preference)
}

}  // namespace fastllm
