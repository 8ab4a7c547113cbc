// AVX-512 float-mode qmatmul for many rows of x (prefill): the GEMM of qmatmul_gemm_float.h on 16-lane vectors and
// 32 registers, for CPUs that issue two 512-bit FMAs a cycle (cpu_zmm_float_gemm: Intel's AVX-512 cores). A panel
// of x is MV vectors of 16 rows (32, the last one 16 when at most 16 rows are left) and a micro-tile 24 / MV weight
// rows: 24 accumulators, MV registers of x and one broadcast weight (27 or 26 of 32). On a 2-core Intel Xeon VM
// (family 6 model 207) at M = 128 on SmolLM2's shapes and 4096 x 4096 this measured about twice the 8-lane GEMM's
// FLOP/s; on a Zen 4 core, whose 512-bit FMAs run as two 256-bit halves, a 32-row version measured the same as the
// 8-lane GEMM at multiples of 32 rows and slower elsewhere (padding), so Zen 4 keeps the 8-lane one.
#include "qmatmul_gemm_float.h"

namespace fastllm::cpu::avx512 {
namespace {

using avx2::kWS;

// Micro::run (qmatmul_gemm_float.h) on 16-lane vectors. (The register loops are unrolled explicitly, as the
// 8-lane kernel's.)
template <int MV>
void micro(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
  constexpr int64_t MR = 16 * MV;
  constexpr int NR = 24 / MV;
  __m512 acc[NR][MV];
#pragma GCC unroll 24
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) acc[j][h] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kc; ++c) {
    __m512 x[MV];
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) x[h] = _mm512_loadu_ps(xt + c * MR + 16 * h);
#pragma GCC unroll 24
    for (int j = 0; j < NR; ++j) {
      const __m512 w = _mm512_set1_ps(wd[j * kWS + c]);
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) acc[j][h] = _mm512_fmadd_ps(x[h], w, acc[j][h]);
    }
  }
#pragma GCC unroll 24
  for (int j = 0; j < NR; ++j) {
    double* o = ct + j * ldc;
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) {
      // (through memory and 4-lane conversions: GCC 12 warns about the "undefined" sources of the 512-bit
      // conversion and extracts; once per chunk, against kc steps of FMAs)
      alignas(64) float v[16];
      _mm512_store_ps(v, acc[j][h]);
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_pd(o + 16 * h + 4 * q,
                         _mm256_add_pd(_mm256_loadu_pd(o + 16 * h + 4 * q), _mm256_cvtps_pd(_mm_load_ps(v + 4 * q))));
    }
  }
}

struct Zmm {
  static constexpr int64_t kLanes = 16;
  static constexpr int kNR2 = 12, kNR1 = 24;
  template <int MV>
  static void run(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
    micro<MV>(xt, wd, kc, ct, ldc);
  }
};

}  // namespace

void gemm_float(const QMatmulArgs& a) {
  dispatch_qformat(a.fmt, [&](auto f) {
    constexpr QFormat F = decltype(f)::value;
    run_gemm<F, avx2::GemmFloat<F, Zmm>>(a);
  });
}

}  // namespace fastllm::cpu::avx512
