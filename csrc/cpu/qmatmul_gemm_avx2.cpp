// AVX2 float-mode qmatmul for many rows of x (prefill): the GEMM of qmatmul_gemm_float.h on 8-lane vectors and 16
// registers. It also runs on AVX-512 CPUs whose 16-lane FMAs are no faster (cpu_zmm_float_gemm).
#include "qmatmul_gemm_float.h"

namespace fastllm::cpu::avx2 {
namespace {

// A panel of x is MV vectors of 8 rows, a micro-tile 12 / MV weight rows: 12 accumulators, plus MV
// registers of x and one broadcast weight. Panels have 16 rows (MV = 2: two loads per 6 broadcasts);
// the last one 8 rows when at most 8 rows are left (MV = 1: 12 broadcasts per load, but none wasted).
template <int MV>
constexpr int64_t kMR = 8 * MV;
template <int MV>
constexpr int kNR = 12 / MV;
// Micro::run (qmatmul_gemm_float.h) on 8-lane vectors. (The loops over registers are unrolled explicitly:
// otherwise GCC keeps acc in memory and stores it every step.)
template <int MV>
void micro(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
  constexpr int64_t MR = kMR<MV>;
  constexpr int NR = kNR<MV>;
  __m256 acc[NR][MV];
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) acc[j][h] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kc; ++c) {
    __m256 x[MV];
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) x[h] = _mm256_loadu_ps(xt + c * MR + 8 * h);
#pragma GCC unroll 12
    for (int j = 0; j < NR; ++j) {
      const __m256 w = _mm256_broadcast_ss(wd + j * kWS + c);
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) acc[j][h] = _mm256_fmadd_ps(x[h], w, acc[j][h]);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j) {
    double* o = ct + j * ldc;
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) {
      const __m256 v = acc[j][h];
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      _mm256_storeu_pd(o + 8 * h, _mm256_add_pd(_mm256_loadu_pd(o + 8 * h), lo));
      _mm256_storeu_pd(o + 8 * h + 4, _mm256_add_pd(_mm256_loadu_pd(o + 8 * h + 4), hi));
    }
  }
}

struct Ymm {
  static constexpr int64_t kLanes = 8;
  static constexpr int kNR2 = kNR<2>, kNR1 = kNR<1>;
  template <int MV>
  static void run(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
    micro<MV>(xt, wd, kc, ct, ldc);
  }
};

}  // namespace

template <QFormat F>
void gemm_float(const QMatmulArgs& a) {
  run_gemm<F, GemmFloat<F, Ymm>>(a);
}

template void gemm_float<QFormat::I8Channel>(const QMatmulArgs&);
template void gemm_float<QFormat::I8Group>(const QMatmulArgs&);
template void gemm_float<QFormat::I4>(const QMatmulArgs&);
template void gemm_float<QFormat::I4Asym>(const QMatmulArgs&);

}  // namespace fastllm::cpu::avx2
