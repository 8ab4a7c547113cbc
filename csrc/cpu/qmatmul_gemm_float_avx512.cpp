// AVX-512 float-mode qmatmul for many rows of x (prefill): the GEMM of qmatmul_gemm_float.h on 16-lane vectors and
// 32 registers, for cores whose 16-lane FMAs give more lanes a second than their 8-lane ones (cpu_zmm_float_gemm:
// measured, cpu_zmm_fma_gain). A panel of x is MV vectors of 16 rows (32, the last one 16 when at most 16 rows are
// left) and a micro-tile 24 / MV weight rows: 24 accumulators, MV registers of x and one broadcast weight (27 or 26
// of 32). On a 2-core Intel Xeon VM (family 6 model 207, FMA gain 1.7-1.9) it ran at 1.15-1.74x the 8-lane GEMM's
// FLOP/s over M = 11-549 on SmolLM2's shapes and 4096 x 4096 (1.5-1.7x from 64 rows; 200-260 GFLOP/s at M = 128).
// On a Zen 4 core, whose 512-bit FMAs run as two 256-bit halves, an earlier 32-row version measured the same as the
// 8-lane GEMM at multiples of 32 rows and slower elsewhere (padding).
#include "qmatmul_gemm_float.h"

namespace fastllm::cpu::avx512 {
namespace {

struct Zmm {
  static constexpr int64_t kLanes = 16;
  static constexpr int kAcc = 24, kNR2 = kAcc / 2, kNR1 = kAcc;
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, T v) { _mm512_store_ps(p, v); }
  template <int MV>
  static void run(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
    avx2::micro<Zmm, kAcc, MV>(xt, wd, kc, ct, ldc);
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
