// AVX2/FMA/F16C helpers for the *_avx2.cpp kernels; include only from files compiled with
// -mavx2 -mfma -mf16c. All of it has internal linkage (see kernels.h).
//
// A row is walked in blocks of 8 elements; the last block may be partial. `len` is either
// kFull (a compile-time 8, so full blocks compile to plain loads/stores) or an int in [1, 8).
// Partial loads fill the missing lanes with 0; partial stores touch only `len` elements.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace fastllm::cpu::avx2 {
namespace {

using Full = std::integral_constant<int, 8>;
constexpr Full kFull{};

template <class L>
constexpr bool is_full = std::is_same_v<L, Full>;

alignas(32) constexpr int32_t kTailMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// Lanes [0, n) all ones, lanes [n, 8) zero.
inline __m256i tail_mask(int n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask + 8 - n));
}

// bf16 is the upper half of an fp32: widen by a 16-bit shift.
inline __m256 bf16x8_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// fp32 -> bf16 rounding to nearest even (u + 0x7fff + lsb, keep the top half); NaN is kept
// a quiet NaN, exactly as float_to_bf16 in common/dtype.h.
inline __m128i float_to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);  // < 2^16, so the unsigned saturating pack below is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <DType D>
inline __m256 widen(__m128i h) {
  if constexpr (D == DType::F16) return _mm256_cvtph_ps(h);
  else return bf16x8_to_float(h);
}

template <DType D>
inline __m128i narrow(__m256 v) {
  if constexpr (D == DType::F16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  else return float_to_bf16x8(v);
}

// Loads `len` elements of type D at p as fp32 lanes (missing lanes 0).
template <DType D, class L>
inline __m256 load(const storage_t<D>* p, L len) {
  if constexpr (D == DType::F32) {
    if constexpr (is_full<L>) return _mm256_loadu_ps(p);
    else return _mm256_maskload_ps(p, tail_mask(len));
  } else {
    if constexpr (is_full<L>) {
      return widen<D>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      alignas(16) uint16_t t[8] = {};
      for (int k = 0; k < len; ++k) t[k] = p[k];
      return widen<D>(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
  }
}

// Rounds v to D once, stores `len` elements at p, and returns the stored values as fp32.
template <DType D, class L>
inline __m256 store(storage_t<D>* p, __m256 v, L len) {
  if constexpr (D == DType::F32) {
    if constexpr (is_full<L>) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, tail_mask(len), v);
    return v;
  } else {
    const __m128i h = narrow<D>(v);
    if constexpr (is_full<L>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t t[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
      for (int k = 0; k < len; ++k) p[k] = t[k];
    }
    return widen<D>(h);
  }
}

// v with the lanes at and beyond `len` replaced by `fill`.
template <class L>
inline __m256 keep(__m256 v, L len, __m256 fill = _mm256_setzero_ps()) {
  if constexpr (is_full<L>) return v;
  else return _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(tail_mask(len)));
}

// Calls f(j, len, k) for the blocks of [0, n): k in {0..3} names one of four independent
// accumulators, so consecutive full blocks do not wait on one add/FMA dependency chain.
template <class F>
inline void for_blocks(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    f(j, kFull, 0);
    f(j + 8, kFull, 1);
    f(j + 16, kFull, 2);
    f(j + 24, kFull, 3);
  }
  for (; j + 8 <= n; j += 8) f(j, kFull, 0);
  if (j < n) f(j, static_cast<int>(n - j), 1);
}

// Returns v unchanged, but the compiler must materialise it first: GCC contracts a vector
// multiply followed by an add/sub into one FMA (-ffp-contract=fast), which would make a value
// computed twice (once alone, once inside an expression) differ in the last bit.
inline __m256 opaque(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// Prefetches into L1 the 32 elements at p: one unrolled step of for_blocks. Used to pull the
// next row in while the current one is processed from cache (prefetches never fault).
template <class S>
inline void prefetch32(const S* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  if constexpr (sizeof(S) == 4) _mm_prefetch(reinterpret_cast<const char*>(p + 16), _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of four accumulators, combined pairwise.
inline float hsum4(const __m256 (&a)[4]) {
  return hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

// e^x for 8 lanes with x <= 0 (softmax calls it with x - max), within ~1 ulp of the correctly
// rounded result, subnormal results included:
//   n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two parts, so r is
//   exact to ~2^-30), p = e^r = 1 + r + r^2 q(r) with q a degree-4 minimax fit (relative error
//   4e-9), e^x = (p * 2^(n + 64)) * 2^-64. The first product is exact (n + 64 is added to p's
//   exponent field) and the second rounds once, also into the subnormal range. n is rounded by
//   adding 1.5 * 2^23 + 64: the low mantissa bits of the sum are then n + 64 (two's complement),
//   which << 23 lines up with the exponent field.
// x is clamped to >= -104 first (e^-104 rounds to 0), which also sends -inf to 0; a NaN passes
// the clamp (max returns its second operand on NaN) and stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582976.0f);  // 1.5 * 2^23 + 64
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.442695022e+00f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(6.931471825e-01f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-1.904654323e-09f), r);
  __m256 q = _mm256_set1_ps(1.381461276e-03f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.368710056e-03f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.166838899e-02f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.666652113e-01f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.999999404e-01f));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_mul_ps(_mm256_castsi256_ps(scaled), _mm256_set1_ps(5.421010862e-20f));  // * 2^-64
}

}  // namespace
}  // namespace fastllm::cpu::avx2
