// AVX2/FMA path of rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd (entry points in kernels.h,
// math in ops.h). One row at a time per thread, fp32 accumulation.
#include <cmath>

#include "kernels.h"
#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

// One row of the forward pass. Add: s = round_D(x + r) is stored and normalised instead of x.
//   rstd = 1 / sqrt(sum(v^2) / N + eps), y = v * rstd * w   (v = x, or the rounded s).
template <DType D, bool HasW, bool Add>
void fwd_row(const storage_t<D>* x, const storage_t<D>* r, storage_t<D>* s, const storage_t<D>* w,
             storage_t<D>* y, int64_t n, float eps, float* rstd_out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for_blocks(n, [&](int64_t j, auto len, int k) {
    __m256 v = load<D>(x + j, len);
    if constexpr (Add) v = store<D>(s + j, _mm256_add_ps(v, load<D>(r + j, len)), len);
    acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
  });
  const float rstd = 1.0f / std::sqrt(hsum4(acc) / static_cast<float>(n) + eps);
  if (rstd_out) *rstd_out = rstd;

  const storage_t<D>* src = Add ? s : x;
  const __m256 rv = _mm256_set1_ps(rstd);
  for_blocks(n, [&](int64_t j, auto len, int) {
    __m256 v = _mm256_mul_ps(load<D>(src + j, len), rv);
    if constexpr (HasW) v = _mm256_mul_ps(v, load<D>(w + j, len));
    store<D>(y + j, v, len);
  });
}

// One row of the backward pass. xhat = x * rstd, g = dy * w;
//   dx = rstd * (g - xhat * mean(g * xhat)) + dextra;  dwp[j] += dy * xhat (when dwp).
template <DType D, bool HasW>
void bwd_row(const storage_t<D>* dy, const storage_t<D>* x, const storage_t<D>* w, float rstd,
             const storage_t<D>* de, storage_t<D>* dx, float* dwp, int64_t n) {
  const __m256 rv = _mm256_set1_ps(rstd);
  auto xhat_g = [&](int64_t j, auto len, __m256& dyv, __m256& xh, __m256& g) {
    dyv = load<D>(dy + j, len);
    xh = _mm256_mul_ps(load<D>(x + j, len), rv);
    if constexpr (HasW) g = _mm256_mul_ps(dyv, load<D>(w + j, len));
    else g = dyv;
  };
  __m256 sgx[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for_blocks(n, [&](int64_t j, auto len, int k) {
    __m256 dyv, xh, g;
    xhat_g(j, len, dyv, xh, g);
    sgx[k] = _mm256_fmadd_ps(g, xh, sgx[k]);
    if (dwp) store<DType::F32>(dwp + j, _mm256_fmadd_ps(dyv, xh, load<DType::F32>(dwp + j, len)), len);
  });
  if (!dx) return;
  const __m256 c = _mm256_set1_ps(hsum4(sgx) / static_cast<float>(n));
  for_blocks(n, [&](int64_t j, auto len, int) {
    __m256 dyv, xh, g;
    xhat_g(j, len, dyv, xh, g);
    __m256 v = _mm256_mul_ps(rv, _mm256_fnmadd_ps(xh, c, g));
    if (de) v = _mm256_add_ps(v, load<D>(de + j, len));
    store<D>(dx + j, v, len);
  });
}

template <DType D, bool HasW, bool Add>
void fwd_rows(const NormFwdArgs& a) {
  using S = storage_t<D>;
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i)
    fwd_row<D, HasW, Add>(row_ptr<D>(a.x, a.x_stride, i), Add ? row_ptr<D>(a.r, a.r_stride, i) : nullptr,
                          Add ? row_ptr<D>(a.s, a.s_stride, i) : nullptr, static_cast<const S*>(a.w),
                          row_ptr<D>(a.y, a.y_stride, i), a.cols, a.eps, a.rstd ? a.rstd + i : nullptr);
}

template <DType D, bool HasW>
void bwd_rows(const NormBwdArgs& a) {
#pragma omp parallel for schedule(static) if (a.nchunks > 1)
  for (int64_t c = 0; c < a.nchunks; ++c) {
    float* dwp = a.part ? a.part + c * a.cols : nullptr;
    const int64_t end = chunk_begin(a.rows, a.nchunks, c + 1);
    for (int64_t i = chunk_begin(a.rows, a.nchunks, c); i < end; ++i)
      bwd_row<D, HasW>(row_ptr<D>(a.dy, a.dy_stride, i), row_ptr<D>(a.x, a.x_stride, i),
                       static_cast<const storage_t<D>*>(a.w), a.rstd[i],
                       a.dextra ? row_ptr<D>(a.dextra, a.dextra_stride, i) : nullptr,
                       a.dx ? row_ptr<D>(a.dx, a.dx_stride, i) : nullptr, dwp, a.cols);
  }
}

}  // namespace

void rms_norm_fwd(const NormFwdArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) {
    dispatch_bool(a.w != nullptr, [&](auto hw) {
      dispatch_bool(a.r != nullptr, [&](auto add) {
        fwd_rows<decltype(d)::value, decltype(hw)::value, decltype(add)::value>(a);
      });
    });
  });
}

void rms_norm_bwd(const NormBwdArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) {
    dispatch_bool(a.w != nullptr, [&](auto hw) { bwd_rows<decltype(d)::value, decltype(hw)::value>(a); });
  });
}

}  // namespace fastllm::cpu::avx2
