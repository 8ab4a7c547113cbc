// The driver of the AVX-512 qmatmul GEMMs for many rows of x (prefill), in the manner of BLIS: the
// activations are packed once per call into panels of G::MR rows; each thread takes tiles of kNC
// weight rows and, per K chunk, unpacks the tile's rows into a buffer the micro-kernel reads (fp32
// for float activations, int8 for int8 activations), then runs G's micro-kernel for every panel of x
// and every micro-tile of G::NR weight rows. The micro-kernel sums a chunk from zero and adds it into
// the tile's outputs in double (ct, weight-row-major); the result times the per-channel int8 row
// scale, plus bias, is rounded to the output dtype once. Policies: GemmFloat
// (qmatmul_gemm_avx512.cpp), GemmInt8 (qmatmul_gemm_int8_avx512.cpp).
// A policy G has:
//   MR (rows of x per panel), NR (weight rows per micro-tile, divides kNC), KC (K per chunk at most)
//   G(a, panels): the call's packed-activation storage; pack(p) fills panel p (rows past m: zeros)
//   G::Tile(g, chunk_blocks): a thread's unpacked-weight buffer; tile.load(rows, jn, jpad, b0, b1)
//     unpacks the blocks [b0, b1) of rows [0, jn) and gives rows [jn, jpad) zero weights
//   micro(tile, p, jj, b0, b1, ct, ldc): ct[j * ldc + r] += the chunk's sum for weight row jj + j
//     (j < NR) and row p * MR + r of x (r < MR)
#pragma once
#include <algorithm>
#include <vector>

#include "qmatmul_avx512.h"

namespace fastllm::cpu::avx512 {

constexpr int64_t kGemmNC = 48;  // weight rows per tile

// ct (NR x 16 MV doubles, row stride ldc) += acc, the micro-kernel's fp32 sums.
template <int NR, int MV>
inline void add_to_double(const __m512 (&acc)[NR][MV], double* ct, int64_t ldc) {
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

template <QFormat F, class G>
void run_gemm(const QMatmulArgs& a) {
  const int64_t m = a.m, k = a.k, nb = k / kBlock, ng = k / a.group;
  const int64_t panels = (m + G::MR - 1) / G::MR, mp = panels * G::MR;
  const int64_t nchunks = (k + G::KC - 1) / G::KC, chunk_blocks = (nb + nchunks - 1) / nchunks;
  const int64_t ntiles = (a.n + kGemmNC - 1) / kGemmNC;
  G g(a, panels);
#pragma omp parallel if (m * a.n * k >= kParallelMinElems)
  {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) g.pack(p);
    typename G::Tile tile(g, chunk_blocks);
    std::vector<float> fs(tile_scale_floats<F>(kGemmNC, ng), 0.0f);
    std::vector<double> ct(kGemmNC * mp);
    WRow rows[kGemmNC];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t j0 = t * kGemmNC, jn = std::min(kGemmNC, a.n - j0), jpad = (jn + G::NR - 1) / G::NR * G::NR;
      tile_rows<F>(a, j0, jn, kGemmNC, fs.data(), rows);
      std::fill(ct.begin(), ct.end(), 0.0);
      for (int64_t b0 = 0; b0 < nb; b0 += chunk_blocks) {
        const int64_t b1 = std::min(nb, b0 + chunk_blocks);
        tile.load(rows, jn, jpad, b0, b1);
        for (int64_t p = 0; p < panels; ++p)
          for (int64_t jj = 0; jj < jpad; jj += G::NR) g.micro(tile, p, jj, b0, b1, ct.data() + jj * mp + p * G::MR, mp);
      }
      double scale[kGemmNC], bias[kGemmNC];
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

}  // namespace fastllm::cpu::avx512
