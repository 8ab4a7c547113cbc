// AVX-512 float-mode qmatmul for many rows of x (prefill): the GEMM policy GemmFloat of
// qmatmul_gemm_avx512.h's driver. y[i, j] = sum_k x[i, k] W[j, k] (+ bias), W dequantised exactly as
// formats.py (int4 through the group's 16-entry table, int8 groups q * d; per-channel int8 takes its
// row scale at the end, as the other paths do).
//   x is packed k-major in panels of MR = 16 MV rows: panel p holds (k, r) at xt[(p * K + k) * MR + r],
//     so one k step is MV vector loads.
//   The tile's weights are dequantised per chunk into wd (row-major, row stride the chunk + kWPad).
//   The micro-kernel keeps 24 accumulators: MV vectors of x by NR = 24 / MV weight rows; each k step
//     is MV loads of x and NR broadcasts of weights for 24 FMAs, summed in fp32 over the chunk (as a
//     BLAS sgemm's rounding) and then added in double.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "qmatmul_gemm_avx512.h"

namespace fastllm::cpu::avx512 {
namespace {

constexpr int64_t kWPad = 16;  // wd's row stride is the chunk + kWPad floats (rows chunk * 4 bytes apart alias in L1)

template <QFormat F, int MV>
struct GemmFloat {
  static constexpr int64_t MR = 16 * MV, KC = 256;  // a panel's chunk of x: 32 KiB at MV = 2
  static constexpr int NR = 24 / MV;
  const QMatmulArgs& a;
  std::vector<float> xt;

  GemmFloat(const QMatmulArgs& args, int64_t panels) : a(args), xt(panels * MR * args.k) {}

  void pack(int64_t p) {
    float* dst = xt.data() + p * a.k * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t i = p * MR + r;
      const float* src = a.xf + i * a.xf_stride;
      for (int64_t c = 0; c < a.k; ++c) dst[c * MR + r] = i < a.m ? src[c] : 0.0f;
    }
  }

  struct Tile {
    int64_t ws;
    std::vector<float> wd;
    Tile(const GemmFloat&, int64_t chunk_blocks) : ws(chunk_blocks * kBlock + kWPad), wd(kGemmNC * ws, 0.0f) {}

    void load(const WRow* rows, int64_t jn, int64_t jpad, int64_t b0, int64_t b1) {
      std::fill(wd.begin() + jn * ws, wd.begin() + jpad * ws, 0.0f);
      for (int64_t jj = 0; jj < jn; ++jj) {
        const WRow& r = rows[jj];
        float* dst = wd.data() + jj * ws;
        int64_t tg = -1;  // the group whose int4 table is built
        __m512 table = _mm512_setzero_ps();
        for (int64_t b = b0; b < b1; ++b) {
          if constexpr (kInt4<F>) {
            if ((b >> r.gshift) != tg) table = int4_table<F>(r, tg = b >> r.gshift);
          }
          __m512 w0, w1;
          dequant_block<F>(r, b, table, w0, w1);
          _mm512_storeu_ps(dst + (b - b0) * kBlock, w0);
          _mm512_storeu_ps(dst + (b - b0) * kBlock + 16, w1);
        }
      }
    }
  };

  void micro(const Tile& t, int64_t p, int64_t jj, int64_t b0, int64_t b1, double* ct, int64_t ldc) const {
    const float* x = xt.data() + (p * a.k + b0 * kBlock) * MR;
    const float* w = t.wd.data() + jj * t.ws;
    __m512 acc[NR][MV];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    for (int64_t c = 0, kc = (b1 - b0) * kBlock; c < kc; ++c) {
      __m512 xv[MV];
      for (int h = 0; h < MV; ++h) xv[h] = _mm512_loadu_ps(x + c * MR + 16 * h);
      for (int j = 0; j < NR; ++j) {
        const __m512 wv = _mm512_set1_ps(w[j * t.ws + c]);
        for (int h = 0; h < MV; ++h) acc[j][h] = _mm512_fmadd_ps(xv[h], wv, acc[j][h]);
      }
    }
    add_to_double<NR, MV>(acc, ct, ldc);
  }
};

}  // namespace

template <QFormat F>
void gemm_float(const QMatmulArgs& a) {
  if (a.m <= 16) run_gemm<F, GemmFloat<F, 1>>(a);  // one-vector panels
  else run_gemm<F, GemmFloat<F, 2>>(a);
}

template void gemm_float<QFormat::I8Channel>(const QMatmulArgs&);
template void gemm_float<QFormat::I8Group>(const QMatmulArgs&);
template void gemm_float<QFormat::I4>(const QMatmulArgs&);
template void gemm_float<QFormat::I4Asym>(const QMatmulArgs&);

}  // namespace fastllm::cpu::avx512
