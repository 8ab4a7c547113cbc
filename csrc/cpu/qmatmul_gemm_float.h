// Private to the float-activation qmatmul GEMMs (prefill: many rows of x) on 8-lane vectors (qmatmul_gemm_avx2.cpp,
// AVX2 FMA) and 16-lane ones (qmatmul_gemm_float_avx512.cpp, AVX-512 FMA): a register-blocked GEMM in the manner of
// BLIS (run_gemm in qmatmul_gemm.h drives it). y[i, j] = sum_k x[i, k] W[j, k] (+ bias), W dequantised exactly as
// formats.py (dequant_block; per-channel int8 applies its row scale to the final sum, as the other paths do).
// The two differ only in their micro-kernels (Micro below); x's packing and the weights' dequantisation are these.
//   x is packed once per call into panels of 2L rows (L = Micro::kLanes; the last one of L rows when at most L
//     are left), k-major: the panel of mr rows from row i0 holds (k, r) at xt[i0 * K + k * mr + r] (rows past m
//     are zeros), so one k step is one or two vector loads (MV = mr / L).
//   Per K chunk (at most kKCMax, 32-aligned, the chunks of a call equal in size) a tile's rows are
//     dequantised into wd (row-major, row stride kWS floats: the micro-kernel's broadcasts are at constant
//     offsets of one pointer); the micro-kernel then takes Micro::kNR2 (two-vector panels) or Micro::kNR1
//     weight rows: MV x kNR accumulators, each k step MV loads of x and kNR broadcasts of weights.
//   The micro-kernel sums a chunk in fp32 from zero and adds it into the tile's outputs in double, so the
//     rounding is that of a chunk-long fp32 dot product per chunk (as a BLAS sgemm's), and the result, bias
//     included, is rounded to the output dtype once.
// Compiled into each including file with that file's flags (internal linkage, as qmatmul_avx2.h).
#pragma once
#include <algorithm>
#include <vector>

#include "qmatmul_avx2.h"
#include "qmatmul_gemm.h"

namespace fastllm::cpu::avx2 {
namespace {

constexpr int64_t kKCMax = 256;  // K per chunk: a panel's chunk of x is 8-16 KiB (16-lane: 16-32), a micro-tile's
                                 // weights 6-12 KiB (16-lane: 12-24)
constexpr int64_t kWS = kKCMax + 16;  // wd's row stride (rows 1 KiB apart would alias in L1)

// The 8 x 8 block v (rows) transposed in place: v[j] becomes column j.
inline void transpose8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    v[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

// The panel of mr rows of x (m x k fp32, row stride xs) from row i0, into xt (see the top): 8 x 8 blocks
// transposed in registers (a scalar loop storing one element per 64-byte row of xt cost ~20% of a
// SmolLM2-sized call at M = 128).
void pack_x(const float* x, int64_t xs, int64_t m, int64_t k, int64_t i0, int64_t mr, float* xt) {
  for (int64_t r0 = 0; r0 < mr; r0 += 8) {
    const float* src[8];
    for (int r = 0; r < 8; ++r) src[r] = i0 + r0 + r < m ? x + (i0 + r0 + r) * xs : nullptr;
    for (int64_t c = 0; c < k; c += 8) {  // k is a multiple of 32
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = src[r] ? _mm256_loadu_ps(src[r] + c) : _mm256_setzero_ps();
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(xt + (c + j) * mr + r0, v[j]);
    }
  }
}

// The blocks [b0, b1) of the weight rows [j0, j0 + jn), dequantised into wd.
template <QFormat F>
void dequant_chunk(const QMatmulArgs& a, int64_t j0, int64_t jn, int64_t b0, int64_t b1, float* wd) {
  for (int64_t jj = 0; jj < jn; ++jj) {
    const WRow r = weight_row<F>(a, j0 + jj);
    float* dst = wd + jj * kWS;
    for (int64_t b = b0; b < b1; ++b) {
      __m256 w[4];
      dequant_block<F>(r, b, w);
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(dst + (b - b0) * kBlock + 8 * v, w[v]);
    }
  }
}

// The micro-kernel on vectors of V::kLanes (L) floats, kAcc accumulators: ct[j * ldc + r] += sum_{c < kc}
// xt[c * MV L + r] * wd[j * kWS + c] for j < NR = kAcc / MV, r < MV L; per k step MV loads of x and NR broadcasts
// of weights for kAcc FMAs. V: the vector type T, zero(), load(p), set1(v), fma(a, b, c), store(p, v) (p 64-byte
// aligned). The chunk's fp32 sums go to ct through memory and 4-lane conversions to double (once per chunk; GCC 12
// warns about the "undefined" sources of the 512-bit conversion and extracts). (The register loops are unrolled
// explicitly: otherwise GCC keeps acc in memory and stores it every step.)
template <class V, int kAcc, int MV>
void micro(const float* xt, const float* wd, int64_t kc, double* ct, int64_t ldc) {
  constexpr int64_t L = V::kLanes, MR = L * MV;
  constexpr int NR = kAcc / MV;
  typename V::T acc[NR][MV];
#pragma GCC unroll 24
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) acc[j][h] = V::zero();
  for (int64_t c = 0; c < kc; ++c) {
    typename V::T x[MV];
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) x[h] = V::load(xt + c * MR + L * h);
#pragma GCC unroll 24
    for (int j = 0; j < NR; ++j) {
      const typename V::T w = V::set1(wd[j * kWS + c]);
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) acc[j][h] = V::fma(x[h], w, acc[j][h]);
    }
  }
#pragma GCC unroll 24
  for (int j = 0; j < NR; ++j) {
    double* o = ct + j * ldc;
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) {
      alignas(64) float v[L];
      V::store(v, acc[j][h]);
#pragma GCC unroll 4
      for (int q = 0; q < L / 4; ++q)
        _mm256_storeu_pd(o + L * h + 4 * q,
                         _mm256_add_pd(_mm256_loadu_pd(o + L * h + 4 * q), _mm256_cvtps_pd(_mm_load_ps(v + 4 * q))));
    }
  }
}

// Micro: the micro-kernels of one vector width: kLanes (L), kNR2 and kNR1 (weight rows per micro-tile of a two-
// and a one-vector panel; kNR2 divides kNR1, and kNR1 divides kGemmTileRows) and run<MV>(xt, wd, kc, ct, ldc),
// micro<V, kAcc, MV> above.
template <QFormat F, class Micro>
struct GemmFloat {
  static_assert(Micro::kNR1 % Micro::kNR2 == 0 && kGemmTileRows % Micro::kNR1 == 0, "micro-tiles must tile a tile");
  static constexpr int64_t MR = 2 * Micro::kLanes;
  const QMatmulArgs& a;
  const Panels panels;
  const int64_t chunk_blocks;
  std::vector<float> xt;

  explicit GemmFloat(const QMatmulArgs& args)
      : a(args), panels(args.m, MR, Micro::kLanes), chunk_blocks(equal_chunk_blocks(args.k / kBlock, kKCMax)),
        xt(panels.padded * args.k) {}

  void pack(int64_t p) { pack_x(a.xf, a.xf_stride, a.m, a.k, p * MR, panels.rows(p), xt.data() + p * MR * a.k); }

  struct Tile {
    const GemmFloat& g;
    std::vector<float> wd;
    int64_t j0 = 0, jn = 0, kc = 0;
    explicit Tile(const GemmFloat& gemm) : g(gemm), wd(kGemmTileRows * kWS, 0.0f) {}

    void start(int64_t first, int64_t rows) {
      j0 = first, jn = rows;
      const int64_t jpad = (jn + Micro::kNR1 - 1) / Micro::kNR1 * Micro::kNR1;  // (kNR2 divides kNR1)
      std::fill(wd.begin() + jn * kWS, wd.begin() + jpad * kWS, 0.0f);  // padding rows: zero weights
    }

    void load(int64_t b0, int64_t b1) {
      dequant_chunk<F>(g.a, j0, jn, b0, b1, wd.data());
      kc = (b1 - b0) * kBlock;
    }

    void panel(int64_t p, int64_t b0, int64_t, double* ct, int64_t ldc) const {
      const int64_t mr = g.panels.rows(p);
      const float* xp = g.xt.data() + p * MR * g.a.k + b0 * kBlock * mr;
      if (mr == MR)
        for (int64_t jj = 0; jj < jn; jj += Micro::kNR2)
          Micro::template run<2>(xp, wd.data() + jj * kWS, kc, ct + jj * ldc, ldc);
      else
        for (int64_t jj = 0; jj < jn; jj += Micro::kNR1)
          Micro::template run<1>(xp, wd.data() + jj * kWS, kc, ct + jj * ldc, ldc);
    }
  };
};

}  // namespace
}  // namespace fastllm::cpu::avx2
