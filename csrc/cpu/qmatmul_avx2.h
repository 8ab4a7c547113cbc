// Private to the AVX2 qmatmul files (compiled with -mavx2 -mfma -mf16c) and the float GEMM's header: a weight row
// and its exact float dequantisation, shared by the row-pass driver (qmatmul_avx2.cpp) and the float GEMM
// (qmatmul_gemm_float.h, also compiled into qmatmul_gemm_float_avx512.cpp with the AVX-512 flags). Internal linkage,
// as everything in vec_avx2.h, so each file has its own copy built with its own flags.
#pragma once
#include <immintrin.h>

#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {

// Float mode, many rows of x (prefill): the register-blocked GEMM of qmatmul_gemm_avx2.cpp.
template <QFormat F>
void gemm_float(const QMatmulArgs& a);

namespace {

constexpr int64_t kBlock = 32;

// One weight row: packed values, scales (f16 per group, or the f32 row scale), mins.
struct WRow {
  const uint8_t* q;
  const uint16_t* s16;
  float s32;
  const uint16_t* mins;
  int gshift;  // the group of block b is b >> gshift
};

// Weight row j of a.w.
template <QFormat F>
inline WRow weight_row(const QMatmulArgs& a, int64_t j) {
  const int64_t ng = a.k / a.group, row_bytes = kInt4<F> ? a.k / 2 : a.k;
  const int gshift = F == QFormat::I8Channel ? 0 : __builtin_ctzll(static_cast<uint64_t>(a.group / kBlock));
  WRow r{static_cast<const uint8_t*>(a.w) + j * row_bytes, nullptr, 0.0f, nullptr, gshift};
  if constexpr (F == QFormat::I8Channel) r.s32 = static_cast<const float*>(a.scales)[j];
  else r.s16 = static_cast<const uint16_t*>(a.scales) + j * ng;
  if constexpr (F == QFormat::I4Asym) r.mins = a.mins + j * ng;
  return r;
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// The 32 values of int4 block b as bytes u in [0, 15], in element order.
inline __m256i int4_block(const uint8_t* row, int64_t b) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// Float mode: block b as 4 x 8 floats, exactly formats.py's dequantisation (per-channel int8: q).
template <QFormat F>
inline void dequant_block(const WRow& r, int64_t b, __m256 (&w)[4]) {
  __m256i i32[4];
  if constexpr (kInt4<F>) {
    __m256i v = int4_block(r.q, b);
    if constexpr (F == QFormat::I4) v = _mm256_sub_epi8(v, _mm256_set1_epi8(8));
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j)
      i32[j] = F == QFormat::I4 ? _mm256_cvtepi8_epi32(parts[j]) : _mm256_cvtepu8_epi32(parts[j]);
  } else {
    for (int j = 0; j < 4; ++j)
      i32[j] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.q + b * kBlock + 8 * j)));
  }
  if constexpr (F == QFormat::I8Channel) {
    for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtepi32_ps(i32[j]);
    return;
  }
  const __m256 d = _mm256_set1_ps(h2f(r.s16[b >> r.gshift]));
  if constexpr (F == QFormat::I4Asym) {
    const __m256 m = _mm256_set1_ps(h2f(r.mins[b >> r.gshift]));
    for (int j = 0; j < 4; ++j) w[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[j]), d, m);  // one rounding
  } else {
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(i32[j]), d);  // exact
  }
}

}  // namespace
}  // namespace fastllm::cpu::avx2
