// AVX-512 float-mode qmatmul for many rows of x (prefill): a register-blocked GEMM in the manner of
// BLIS, whose "B panel" is the weights dequantised to fp32 once per tile and K chunk and reused by
// every row of x. y[i, j] = sum_k x[i, k] W[j, k] (+ bias), W dequantised exactly as formats.py (int4
// through the group's 16-entry table, int8 groups q * d; per-channel int8 applies its row scale to
// the final sum, as the other paths do).
//   x is packed once per call into panels of kMR = 32 rows, k-major: panel p holds (k, r) at
//     xt[(p * K + k) * 32 + r] (rows past m are zeros), so one k step is two vector loads.
//   Each thread takes tiles of kNC weight rows. Per K chunk (at most kKCMax, 32-aligned, the chunks
//     of a call equal in size) it dequantises the tile's rows into wd (row-major, kc floats per row,
//     rows past the tile's end zero), then for every panel of x and every micro-tile of kNR weight
//     rows runs the micro-kernel: 2 x kNR accumulators (32 rows of x by kNR weight rows), each k step
//     two loads of x and kNR broadcasts of weights for 2 kNR FMAs.
//   The micro-kernel sums a chunk in fp32 from zero and adds it into the tile's outputs in double
//     (ct, weight-row-major), so the rounding is that of a chunk-long fp32 dot product per chunk
//     (as a BLAS sgemm's), and the result, bias included, is rounded to the output dtype once.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <algorithm>
#include <cstring>
#include <vector>

#include "qmatmul_avx512.h"

namespace fastllm::cpu::avx512 {
namespace {

// A panel of x is MV vectors of 16 rows (MV = 2; 1 for at most 16 rows of x), a micro-tile 24 / MV
// weight rows: 24 accumulators.
template <int MV>
constexpr int64_t kMR = 16 * MV;
template <int MV>
constexpr int kNR = 24 / MV;
constexpr int64_t kNC = 48;     // weight rows per tile (every kNR divides it)
constexpr int64_t kKCMax = 256; // K per chunk: a panel's chunk of x is 32 KiB, a micro-tile's weights 12
constexpr int64_t kWPad = 16;   // wd's row stride is kc + kWPad floats (rows kc * 4 bytes apart alias in L1)

// Panel p of x (m x k fp32, row stride xs), see the top.
template <int MV>
void pack_x(const float* x, int64_t xs, int64_t m, int64_t k, int64_t p, float* xt) {
  constexpr int64_t MR = kMR<MV>;
  float* dst = xt + p * k * MR;
  for (int64_t r = 0; r < MR; ++r) {
    const int64_t i = p * MR + r;
    if (i >= m) {
      for (int64_t c = 0; c < k; ++c) dst[c * MR + r] = 0.0f;
      continue;
    }
    const float* src = x + i * xs;
    for (int64_t c = 0; c < k; ++c) dst[c * MR + r] = src[c];
  }
}

// ct[j * ldc + r] += sum_{c < kc} xt[c * MR + r] * wd[j * ws + c] for j < kNR, r < MR.
template <int MV>
void micro(const float* xt, const float* wd, int64_t ws, int64_t kc, double* ct, int64_t ldc) {
  constexpr int64_t MR = kMR<MV>;
  constexpr int NR = kNR<MV>;
  __m512 acc[NR][MV];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t c = 0; c < kc; ++c) {
    __m512 x[MV];
    for (int h = 0; h < MV; ++h) x[h] = _mm512_loadu_ps(xt + c * MR + 16 * h);
    for (int j = 0; j < NR; ++j) {
      const __m512 w = _mm512_set1_ps(wd[j * ws + c]);
      for (int h = 0; h < MV; ++h) acc[j][h] = _mm512_fmadd_ps(x[h], w, acc[j][h]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    double* o = ct + j * ldc;
    for (int h = 0; h < MV; ++h) {
      const __m512 v = acc[j][h];
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      _mm512_storeu_pd(o + 16 * h, _mm512_add_pd(_mm512_loadu_pd(o + 16 * h), lo));
      _mm512_storeu_pd(o + 16 * h + 8, _mm512_add_pd(_mm512_loadu_pd(o + 16 * h + 8), hi));
    }
  }
}

// The blocks [b0, b1) of the tile's rows [0, jn), dequantised into wd (row stride ws).
template <QFormat F>
void dequant_chunk(const WRow* rows, int64_t jn, int64_t b0, int64_t b1, float* wd, int64_t ws) {
  for (int64_t jj = 0; jj < jn; ++jj) {
    const WRow& r = rows[jj];
    float* dst = wd + jj * ws;
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

template <QFormat F, int MV>
void gemm(const QMatmulArgs& a) {
  constexpr int64_t MR = kMR<MV>;
  constexpr int NR = kNR<MV>;
  const int64_t m = a.m, k = a.k, nb = k / kBlock, ng = k / a.group;
  const int64_t panels = (m + MR - 1) / MR, mp = panels * MR;
  const int64_t nchunks = (nb * kBlock + kKCMax - 1) / kKCMax;
  const int64_t chunk_blocks = (nb + nchunks - 1) / nchunks, kc_max = chunk_blocks * kBlock, ws = kc_max + kWPad;
  const int64_t ntiles = (a.n + kNC - 1) / kNC;
  std::vector<float> xt(mp * k);
#pragma omp parallel if (m * a.n * k >= kParallelMinElems)
  {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) pack_x<MV>(a.xf, a.xf_stride, m, k, p, xt.data());
    std::vector<float> fs(tile_scale_floats<F>(kNC, ng), 0.0f), wd(kNC * ws, 0.0f);
    std::vector<double> ct(kNC * mp);
    WRow rows[kNC];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t j0 = t * kNC, jn = std::min(kNC, a.n - j0), jpad = (jn + NR - 1) / NR * NR;
      tile_rows<F>(a, j0, jn, kNC, fs.data(), rows);
      std::fill(ct.begin(), ct.end(), 0.0);
      if (jn < jpad) std::fill(wd.begin() + jn * ws, wd.begin() + jpad * ws, 0.0f);  // padding rows: zero weights
      for (int64_t b0 = 0; b0 < nb; b0 += chunk_blocks) {
        const int64_t b1 = std::min(nb, b0 + chunk_blocks), kc = (b1 - b0) * kBlock;
        dequant_chunk<F>(rows, jn, b0, b1, wd.data(), ws);
        for (int64_t p = 0; p < panels; ++p) {
          const float* xp = xt.data() + (p * k + b0 * kBlock) * MR;
          for (int64_t jj = 0; jj < jpad; jj += NR)
            micro<MV>(xp, wd.data() + jj * ws, ws, kc, ct.data() + jj * mp + p * MR, mp);
        }
      }
      double scale[kNC], bias[kNC];
      for (int64_t jj = 0; jj < jn; ++jj) {
        scale[jj] = F == QFormat::I8Channel ? rows[jj].s32 : 1.0;
        bias[jj] = a.bias ? load_as_float(a.bias, j0 + jj, a.dt) : 0.0;
      }
      const size_t es = dtype_size(a.dt);
      for (int64_t i = 0; i < m; ++i)  // row by row: each row of y gets jn adjacent outputs
        for (int64_t jj = 0; jj < jn; ++jj)
          store_from_float(static_cast<char*>(a.y) + i * a.y_stride * es, j0 + jj,
                           static_cast<float>(ct[jj * mp + i] * scale[jj] + bias[jj]), a.dt);
    }
  }
}

}  // namespace

template <QFormat F>
void gemm_float(const QMatmulArgs& a) {
  if (a.m <= 16) gemm<F, 1>(a);
  else gemm<F, 2>(a);
}

template void gemm_float<QFormat::I8Channel>(const QMatmulArgs&);
template void gemm_float<QFormat::I8Group>(const QMatmulArgs&);
template void gemm_float<QFormat::I4>(const QMatmulArgs&);
template void gemm_float<QFormat::I4Asym>(const QMatmulArgs&);

}  // namespace fastllm::cpu::avx512
