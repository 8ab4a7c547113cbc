// AVX-512 form of qmatmul.cpp's int8-mode activation quantisation (chosen there at run time).
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* (a known
// false positive), once per intrinsic use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>
#include <limits>

#include "kernels.h"

namespace fastllm::cpu::avx512 {

constexpr int kBlock = 32;

// qmatmul.cpp's quantize_block with the same IEEE operations on 2 x 16 lanes: |x| <= FLT_MAX for all
// (else q = 0, d = NaN, sum = 0), amax = the largest |x|, q = round-half-even(x * (127 / amax)) (the
// conversion rounds as MXCSR says, as nearbyint does), d = amax / 127.
void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum) {
  const __m512 a0 = _mm512_abs_ps(_mm512_loadu_ps(x)), a1 = _mm512_abs_ps(_mm512_loadu_ps(x + 16));
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  if ((_mm512_cmp_ps_mask(a0, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(a1, big, _CMP_LE_OQ)) != 0xFFFF) {
    std::memset(q, 0, kBlock);
    *d = std::numeric_limits<float>::quiet_NaN();
    *sum = 0;
    return;
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  const __m512 inv = _mm512_set1_ps(amax == 0.0f ? 0.0f : 127.0f / amax);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inv));
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16), inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
  *d = amax / 127.0f;
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

}  // namespace fastllm::cpu::avx512
