// AVX2 float-mode qmatmul for many rows of x (prefill): the GEMM of qmatmul_gemm_float.h on 8-lane vectors and 16
// registers. It also runs on AVX-512 CPUs whose 16-lane FMAs are no faster (cpu_zmm_float_gemm).
#include "qmatmul_gemm_float.h"

namespace fastllm::cpu::avx2 {
namespace {

// A panel of x is MV vectors of 8 rows, a micro-tile 12 / MV weight rows: 12 accumulators, plus MV
// registers of x and one broadcast weight. Panels have 16 rows (MV = 2: two loads per 6 broadcasts);
// the last one 8 rows when at most 8 rows are left (MV = 1: 12 broadcasts per load, but none wasted).
struct Ymm {
  static constexpr int64_t kLanes = 8;
  static constexpr int kAcc = 12, kNR2 = kAcc / 2, kNR1 = kAcc;
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, T v) { _mm256_store_ps(p, v); }
  template <int MV>
  static void run(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
    micro<Ymm, kAcc, MV>(xt, wd, kc, ct, ldc);
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
