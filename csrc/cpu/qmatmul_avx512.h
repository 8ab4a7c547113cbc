// Private to the AVX-512 qmatmul files (compiled with AVX-512 flags only): the walk in 64-byte
// units, the int8-mode activations, a weight row, and the single-row (m = 1, decode) kernels of
// qmatmul_m1_avx512.cpp that the driver (qmatmul_avx512.cpp, whose header comment has the layout of
// the units) calls per tile of weight rows.
#pragma once
#include <immintrin.h>

#include <vector>

#include "kernels.h"

namespace fastllm::cpu::avx512 {

constexpr int64_t kBlock = 32;
constexpr int64_t kUnitBytes = 64;  // one zmm of packed weights
constexpr int64_t kScalePad = 16;          // float scale arrays are read 16 at a time

template <QFormat F>
constexpr bool kInt4 = F == QFormat::I4 || F == QFormat::I4Asym;
template <QFormat F>
constexpr int64_t kUnit = kInt4<F> ? 4 : 2;  // blocks per unit
// weight rows sharing the activation loads at m = 1 (divides kRowTile); int8 weights: one, the rows
// interleaved then slow down streaming them from DRAM more than the shared loads gain
template <QFormat F>
constexpr int kM1Rows = kInt4<F> ? 4 : 1;

// Activations of the int8 mode, re-laid once per call per unit t and row i of x (see the top), at
// index t * m + i (the rows of a unit are adjacent: rows m * K apart would share L1 sets):
// xq: kUnit * 32 bytes (int4: low-nibble half then high-nibble half; int8: qx + 128 in order),
// nc: 16 int32 (int4 only), dxe: 16 floats (lane l: dx of the unit's block l / (16 / U)).
struct Acts {
  std::vector<uint8_t> xq;
  std::vector<int32_t> nc;
  std::vector<float> dxe;
  int64_t units;
};

// Float mode, int4, m = 1: x re-laid for rows_float_m1 (qmatmul_m1_avx512.cpp has the layout).
struct FloatM1Acts {
  std::vector<float> xk;  // units * 128
};
FloatM1Acts prepare_float_m1(const QMatmulArgs& a);

// The 16 lanes of v added in double.
inline double reduce_to_double(__m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

// One weight row: packed values, per-group scales and mins as floats (kScalePad past the end), the
// per-channel scale, and the group of block b: b >> gshift.
struct WRow {
  const uint8_t* q;
  const float* d;
  const float* m;
  float s32;
  int gshift;
};

// The 64 bytes of unit t of a row with nb blocks (the last unit masked to the row's end).
template <QFormat F>
inline __m512i load_unit(const uint8_t* q, int64_t t, int64_t nb) {
  constexpr int64_t U = kUnit<F>, block_bytes = kUnitBytes / U;
  const int64_t left = (nb - t * U) * block_bytes;
  if (left >= kUnitBytes) return _mm512_loadu_si512(q + t * kUnitBytes);
  return _mm512_maskz_loadu_epi8(_cvtu64_mask64((uint64_t(1) << left) - 1), q + t * kUnitBytes);
}

// m = 1, the rows [0, jn) of a tile: part[j] += x . W row rows[j] over the units [t0, t1) of K (int8
// mode; per-channel int8 before the row scale; int4_asym with its min term when sx is not null).
template <QFormat F>
void tile_int8_m1(const Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t t0, int64_t t1, const float* sx,
                  int64_t ng, double* part);
// The same in float mode over all of K, int4 weights.
template <QFormat F>
void tile_float_m1(const FloatM1Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t ng, double* part);

}  // namespace fastllm::cpu::avx512
