// AVX2/FMA inner loops of decode attention (see decode_attention.h for the driver and the math): dot products
// and axpy over a head's D features, 8 lanes at a time (four independent accumulators for the dot product), and
// the softmax exponentials 8 at a time.
#include "decode_attention.h"

#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

// `len` int8 values at p as fp32 lanes (missing lanes 0).
template <class L>
inline __m256 load_i8(const int8_t* p, L len) {
  int64_t bits = 0;
  if constexpr (is_full<L>) std::memcpy(&bits, p, 8);
  else std::memcpy(&bits, p, static_cast<size_t>(len));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits)));
}

struct Avx2Ops {
  template <DType D>
  static float dot(const float* q, const storage_t<D>* k, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for_blocks(n, [&](int64_t j, auto len, int c) {
      acc[c] = _mm256_fmadd_ps(load<DType::F32>(q + j, len), load<D>(k + j, len), acc[c]);
    });
    return hsum4(acc);
  }
  static float dot_i8(const float* q, const int8_t* k, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for_blocks(n, [&](int64_t j, auto len, int c) {
      acc[c] = _mm256_fmadd_ps(load<DType::F32>(q + j, len), load_i8(k + j, len), acc[c]);
    });
    return hsum4(acc);
  }
  template <DType D>
  static void axpy(float* acc, float p, const storage_t<D>* v, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    for_blocks(n, [&](int64_t j, auto len, int) {
      store<DType::F32>(acc + j, _mm256_fmadd_ps(pv, load<D>(v + j, len), load<DType::F32>(acc + j, len)), len);
    });
  }
  static void axpy_i8(float* acc, float p, const int8_t* v, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    for_blocks(n, [&](int64_t j, auto len, int) {
      store<DType::F32>(acc + j, _mm256_fmadd_ps(pv, load_i8(v + j, len), load<DType::F32>(acc + j, len)), len);
    });
  }
  // exp8 (vec_avx2.h, ~1 ulp) of the non-positive s[j] - m; the lanes past n add nothing.
  static float exp_sum(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for_blocks(n, [&](int64_t j, auto len, int) {
      const __m256 e = store<DType::F32>(s + j, exp8(_mm256_sub_ps(load<DType::F32>(s + j, len), mv)), len);
      acc = _mm256_add_ps(acc, keep(e, len));
    });
    return hsum(acc);
  }
};

}  // namespace

void decode_attention(const DecodeAttnArgs& a) { decode_attention_run<Avx2Ops>(a); }

}  // namespace fastllm::cpu::avx2
