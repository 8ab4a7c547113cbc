// AVX2/FMA path of silu_mul (entry point in kernels.h, math in ops.h). With e = exp(-|g|) (exp8 of a
// non-positive argument, within ~1 ulp): sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, which
// never overflows; y = g * sigmoid(g) * u in fp32, rounded once. g = -inf gives NaN (-inf * 0), as torch's
// silu does; NaN stays NaN.
#include "kernels.h"
#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

template <DType D>
void rows(const RowArgs& a) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const auto* g = row_ptr<D>(a.a, a.a_stride, i);
    const auto* u = row_ptr<D>(a.b, a.b_stride, i);
    auto* y = row_ptr<D>(a.out, a.out_stride, i);
    for_blocks(a.cols, [&](int64_t j, auto len, int) {
      const __m256 gv = load<D>(g + j, len);
      const __m256 e = exp8(_mm256_or_ps(gv, sign));  // exp(-|g|)
      const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ));
      const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
      store<D>(y + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), load<D>(u + j, len)), len);
    });
  }
}

}  // namespace

void silu_mul(const RowArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) { rows<decltype(d)::value>(a); });
}

}  // namespace fastllm::cpu::avx2
