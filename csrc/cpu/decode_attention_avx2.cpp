// AVX2/FMA inner loops of decode attention (see decode_attention.h for the driver and the math): the dot
// products of a query with a block of 8 cache rows (one accumulator per row, reduced together), the weighted
// sum of a block of rows into a query's accumulator (loaded and stored once per block), and the softmax
// exponentials, 8 lanes at a time.
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

// `len` elements of a cache row (dtype D, or int8 when I8) at p as fp32 lanes.
template <DType D, bool I8, class L>
inline __m256 load_row(const cache_t<D, I8>* p, L len) {
  if constexpr (I8) return load_i8(p, len);
  else return load<D>(p, len);
}

// The 8 sums of the lanes of a[0..7], lane t holding a[t]'s.
inline __m256 hsum8x8(const __m256 (&a)[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo4 = _mm256_hadd_ps(s01, s23), hi4 = _mm256_hadd_ps(s45, s67);  // [0 1 2 3 | 0 1 2 3] halves
  return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

struct Avx2Ops {
  // 8 dot products at once: one accumulator per row over the features, then one transposing reduction.
  template <DType D, bool I8>
  static void dots(const float* q, const cache_t<D, I8>* const* rows, int64_t n, float* out) {
    static_assert(kKeyBlock == 8, "one lane per row");
    __m256 acc[8];
    for (auto& v : acc) v = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 qv = _mm256_loadu_ps(q + j);
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qv, load_row<D, I8>(rows[t] + j, kFull), acc[t]);
    }
    if (j < n) {
      const int len = static_cast<int>(n - j);
      const __m256 qv = load<DType::F32>(q + j, len);
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qv, load_row<D, I8>(rows[t] + j, len), acc[t]);
    }
    _mm256_storeu_ps(out, hsum8x8(acc));
  }
  // acc += sum_t p[t] rows[t], 32 features (4 accumulators) at a time.
  template <DType D, bool I8>
  static void axpys(float* acc, const float* p, const cache_t<D, I8>* const* rows, int nr, int64_t n) {
    __m256 pv[8];
    for (int t = 0; t < nr; ++t) pv[t] = _mm256_set1_ps(p[t]);
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      __m256 a[4];
      for (int u = 0; u < 4; ++u) a[u] = _mm256_loadu_ps(acc + j + 8 * u);
      for (int t = 0; t < nr; ++t)
        for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(pv[t], load_row<D, I8>(rows[t] + j + 8 * u, kFull), a[u]);
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(acc + j + 8 * u, a[u]);
    }
    for (; j < n; j += 8) {
      const int len = static_cast<int>(std::min<int64_t>(8, n - j));
      __m256 a = load<DType::F32>(acc + j, len);
      for (int t = 0; t < nr; ++t) a = _mm256_fmadd_ps(pv[t], load_row<D, I8>(rows[t] + j, len), a);
      store<DType::F32>(acc + j, a, len);
    }
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
