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

constexpr int kDigits = 5;  // int8 digits per element of x in rows_digits_m1

// Float mode, int4, m = 1 (qmatmul_m1_avx512.cpp has the layouts): x as kDigits int8 digits per element for
// rows_digits_m1 where the weights are exact (QMatmulArgs::exact) and x's range allows (digits_ok), else x re-laid
// for rows_float_m1.
struct FloatM1Acts {
  std::vector<float> xk;         // units * 128 (when !digits_ok)
  bool digits_ok;                // x's range and its blocks' spread allow the digits (prepare_digits)
  std::vector<uint8_t> digits;   // units * kDigits * 128: per unit and digit, the low-nibble then high-nibble plane
  std::vector<int32_t> nc;       // units * kDigits * 16: -8 * (lane's sum of the digit)
  std::vector<float> xs;         // units * 16: 2^(E_b - 7) of lane l's block b
  std::vector<float> sxg;        // ng: sum of x over each group (int4_asym's min term)
};
FloatM1Acts prepare_float_m1(const QMatmulArgs& a);

// Float mode, int4, up to kGemmBf16MinM - 1 bfloat16 rows of x (qmatmul_rows_avx512bf16.cpp, AVX512_BF16
// CPUs): x re-laid per pair of blocks (that file has the layout; row i of pair P at (P * m + i) * 64), and per
// row and group the sum of x (int4_asym's min term).
struct Bf16Acts {
  std::vector<uint16_t> xk;  // ((nb + 1) / 2) * m * 64 bfloat16
  std::vector<float> sxg;    // m * (k / group)
};
Bf16Acts prepare_bf16(const QMatmulArgs& a);

// The register tiles of a tile's weight rows [0, jn) against m rows of x: passes over the rows of x of at most XR
// rows each, as even as can be; per pass, tiles of R weight rows (R = decltype(rows_for(mt))::value for a pass
// of mt rows, an integral constant) and then single rows. f(r, mt, m0, jj, out) computes the tile of weight
// rows jj .. jj + r - 1 and rows of x m0 .. m0 + mt - 1 (r, mt integral constants) into out, r-major, which is
// added to part[(jj + r') * m + m0 + i].
template <int XR, typename RowsFor, typename Fn>
void for_register_tiles(int64_t jn, int64_t m, double* part, RowsFor rows_for, Fn&& f) {
  const int64_t passes = (m + XR - 1) / XR;
  for (int64_t m0 = 0, pass_i = 0; m0 < m; ++pass_i) {
    const int64_t mt = (m - m0) / (passes - pass_i);  // even passes: the later ones take the extra rows
    dispatch_upto<XR>(static_cast<int>(mt), [&](auto t) {
      constexpr int MT = decltype(t)::value;
      auto tile = [&](auto rt, int64_t jj) {
        constexpr int R = decltype(rt)::value;
        double out[R * MT];
        f(rt, t, m0, jj, out);
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < MT; ++i) part[(jj + r) * m + m0 + i] += out[r * MT + i];
      };
      constexpr int R = decltype(rows_for(t))::value;
      int64_t jj = 0;
      for (; jj + R <= jn; jj += R) tile(std::integral_constant<int, R>{}, jj);
      for (; jj < jn; ++jj) tile(std::integral_constant<int, 1>{}, jj);
    });
    m0 += mt;
  }
}

// ct (NR x 16 MV doubles, row stride ldc) += acc: the GEMMs' fp32 sums of a K chunk, added in double.
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

// n halves -> floats (dst has room for n rounded up to 16).
inline void halves_to_floats(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

// Floats tile_rows needs for a tile of up to `cap` weight rows with ng groups each.
template <QFormat F>
inline int64_t tile_scale_floats(int64_t cap, int64_t ng) {
  return F == QFormat::I8Channel ? 0 : cap * ng * (F == QFormat::I4Asym ? 2 : 1) + 2 * kScalePad;
}

// The weight rows [j0, j0 + jn) as WRows (jn <= cap), their f16 scales and mins converted into fs
// (tile_scale_floats<F>(cap, ng) floats).
template <QFormat F>
inline void tile_rows(const QMatmulArgs& a, int64_t j0, int64_t jn, int64_t cap, float* fs, WRow* rows) {
  const int64_t ng = a.k / a.group, row_bytes = kInt4<F> ? a.k / 2 : a.k;
  const int gshift = F == QFormat::I8Channel ? 0 : __builtin_ctzll(static_cast<uint64_t>(a.group / kBlock));
  float* fd = fs;
  float* fm = fs + cap * ng + kScalePad;
  if constexpr (F != QFormat::I8Channel) {
    halves_to_floats(static_cast<const uint16_t*>(a.scales) + j0 * ng, jn * ng, fd);
    if constexpr (F == QFormat::I4Asym) halves_to_floats(a.mins + j0 * ng, jn * ng, fm);
  }
  for (int64_t jj = 0; jj < jn; ++jj) {
    const int64_t j = j0 + jj;
    rows[jj] = {static_cast<const uint8_t*>(a.w) + j * row_bytes, fd + jj * ng, fm + jj * ng, 0.0f, gshift};
    if constexpr (F == QFormat::I8Channel) rows[jj].s32 = static_cast<const float*>(a.scales)[j];
  }
}

// The 64 bytes of unit t of a row with nb blocks (the last unit masked to the row's end).
template <QFormat F>
inline __m512i load_unit(const uint8_t* q, int64_t t, int64_t nb) {
  constexpr int64_t U = kUnit<F>, block_bytes = kUnitBytes / U;
  const int64_t left = (nb - t * U) * block_bytes;
  if (left >= kUnitBytes) return _mm512_loadu_si512(q + t * kUnitBytes);
  return _mm512_maskz_loadu_epi8(_cvtu64_mask64((uint64_t(1) << left) - 1), q + t * kUnitBytes);
}

// The lanes of unit t (16 / kUnit per block) whose block is one of the row's nb: all of them but in a
// partial last unit, whose scales past the row's end must not be read (the next row's, times zero
// weights and activations, would still turn an inf or NaN scale there into a NaN in this row).
template <QFormat F>
inline __mmask16 unit_lanes(int64_t t, int64_t nb) {
  constexpr int64_t U = kUnit<F>;
  const int64_t left = nb - t * U;
  return left >= U ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (left * (16 / U))) - 1);
}

// Float mode, int4: the dequantised value of every u in [0, 15] for group g (exact, as formats.py).
template <QFormat F>
inline __m512 int4_table(const WRow& r, int64_t g) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 d = _mm512_set1_ps(r.d[g]);
  if constexpr (F == QFormat::I4) return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0f)), d);
  else return _mm512_fmadd_ps(iota, d, _mm512_set1_ps(r.m[g]));  // u d exact, + m rounded once
}

// Float mode: the 32 values of block b as two vectors of 16 floats, formats.py's dequantisation
// (per-channel int8: q); int4 reads the block's group table.
template <QFormat F>
inline void dequant_block(const WRow& r, int64_t b, __m512 table, __m512& w0, __m512& w1) {
  if constexpr (kInt4<F>) {
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + b * 16)));
    w0 = _mm512_permutexvar_ps(u, table);  // vpermps reads the low 4 bits: the low nibble
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table);
  } else {
    const __m128i* q = reinterpret_cast<const __m128i*>(r.q + b * kBlock);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    if constexpr (F == QFormat::I8Group) {
      const __m512 d = _mm512_set1_ps(r.d[b >> r.gshift]);
      w0 = _mm512_mul_ps(w0, d);  // exact
      w1 = _mm512_mul_ps(w1, d);
    }
  }
}

// m = 1, the rows [0, jn) of a tile: part[j] += x . W row rows[j] over the units [t0, t1) of K (int8
// mode; per-channel int8 before the row scale; int4_asym with its min term when sx is not null).
template <QFormat F>
void tile_int8_m1(const Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t t0, int64_t t1, const float* sx,
                  int64_t ng, double* part);
// The same in float mode over all of K, int4 weights.
template <QFormat F>
void tile_float_m1(const FloatM1Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t ng, double* part);

// Float mode, int4, the rows [0, jn) of a tile against the m bfloat16 rows of x (a.xbf, m < kGemmBf16MinM) on an
// AVX512_BF16 CPU, over all of K: part[j * m + i] += their dot products, without int4_asym's min term.
void tile_bf16(const Bf16Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t m, double* part);

// Float mode, int4 weights, many bfloat16 rows of x (a.xbf, AVX512_BF16 CPUs): the GEMM of
// qmatmul_gemm_avx512bf16.cpp.
template <QFormat F>
void gemm_bf16(const QMatmulArgs& a);

// Int8 mode, many rows of x (prefill): the register-blocked VNNI GEMM of qmatmul_gemm_int8_avx512.cpp.
template <QFormat F>
void gemm_int8(const QMatmulArgs& a);

}  // namespace fastllm::cpu::avx512
