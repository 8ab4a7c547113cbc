// AVX2/FMA path of layer_norm_fwd / layer_norm_bwd (entry points in kernels.h, math in ops.h).
// One row at a time per thread; every pass over a row reads it from L1/L2, fp32 accumulation.
#include <cmath>

#include "kernels.h"
#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

// One row of the forward pass.
//   mean0 = sum(x) / N; d = x - mean0;
//   mean = mean0 + sum(d) / N, var = (sum(d^2) - sum(d)^2 / N) / N   (corrected two-pass: exact
//   to fp32 rounding even when |mean| >> std); rstd = 1 / sqrt(var + eps);
//   y = (x - mean) * rstd * w + b.
template <DType D, bool HasW, bool HasB>
void fwd_row(const storage_t<D>* x, const storage_t<D>* w, const storage_t<D>* b, storage_t<D>* y,
             int64_t n, float eps, float* mean_out, float* rstd_out) {
  const float inv_n = 1.0f / static_cast<float>(n);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for_blocks(n, [&](int64_t j, auto len, int k) { acc[k] = _mm256_add_ps(acc[k], load<D>(x + j, len)); });
  float mean = hsum4(acc) * inv_n;

  const __m256 m0 = _mm256_set1_ps(mean);
  __m256 sd[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 sq[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for_blocks(n, [&](int64_t j, auto len, int k) {
    const __m256 d = keep(_mm256_sub_ps(load<D>(x + j, len), m0), len);
    sd[k] = _mm256_add_ps(sd[k], d);
    sq[k] = _mm256_fmadd_ps(d, d, sq[k]);
  });
  const float s1 = hsum4(sd);
  float var = (hsum4(sq) - s1 * s1 * inv_n) * inv_n;
  var = var < 0.0f ? 0.0f : var;  // keeps NaN
  mean += s1 * inv_n;
  const float rstd = 1.0f / std::sqrt(var + eps);
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;

  const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
  for_blocks(n, [&](int64_t j, auto len, int) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(load<D>(x + j, len), mv), rv);
    if constexpr (HasW && HasB) v = _mm256_fmadd_ps(v, load<D>(w + j, len), load<D>(b + j, len));
    else if constexpr (HasW) v = _mm256_mul_ps(v, load<D>(w + j, len));
    else if constexpr (HasB) v = _mm256_add_ps(v, load<D>(b + j, len));
    store<D>(y + j, v, len);
  });
}

// One row of the backward pass. xhat = (x - mean) * rstd, g = dy * w;
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat));
//   dwp[j] += dy * xhat, dbp[j] += dy (this chunk's partial column sums; skipped when null).
template <DType D, bool HasW>
void bwd_row(const storage_t<D>* dy, const storage_t<D>* x, const storage_t<D>* w, float mean,
             float rstd, storage_t<D>* dx, float* dwp, float* dbp, int64_t n) {
  const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
  // xhat and g of one block; lanes past the row end are 0.
  auto xhat_g = [&](int64_t j, auto len, __m256& dyv, __m256& xh, __m256& g) {
    dyv = load<D>(dy + j, len);
    xh = keep(_mm256_mul_ps(_mm256_sub_ps(load<D>(x + j, len), mv), rv), len);
    // opaque: the same rounded g in both passes, so g - mean(g) is exactly 0 for a constant g.
    if constexpr (HasW) g = opaque(_mm256_mul_ps(dyv, load<D>(w + j, len)));
    else g = dyv;
  };
  __m256 sg[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 sgx[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for_blocks(n, [&](int64_t j, auto len, int k) {
    __m256 dyv, xh, g;
    xhat_g(j, len, dyv, xh, g);
    sg[k] = _mm256_add_ps(sg[k], g);
    sgx[k] = _mm256_fmadd_ps(g, xh, sgx[k]);
    if (dwp) {
      store<DType::F32>(dwp + j, _mm256_fmadd_ps(dyv, xh, load<DType::F32>(dwp + j, len)), len);
      store<DType::F32>(dbp + j, _mm256_add_ps(dyv, load<DType::F32>(dbp + j, len)), len);
    }
  });
  if (!dx) return;
  const float inv_n = 1.0f / static_cast<float>(n);
  const __m256 a = _mm256_set1_ps(hsum4(sg) * inv_n), c = _mm256_set1_ps(hsum4(sgx) * inv_n);
  for_blocks(n, [&](int64_t j, auto len, int) {
    __m256 dyv, xh, g;
    xhat_g(j, len, dyv, xh, g);
    store<D>(dx + j, _mm256_mul_ps(rv, _mm256_fnmadd_ps(xh, c, _mm256_sub_ps(g, a))), len);
  });
}

template <DType D, bool HasW, bool HasB>
void fwd_rows(const NormFwdArgs& a) {
  using S = storage_t<D>;
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i)
    fwd_row<D, HasW, HasB>(row_ptr<D>(a.x, a.x_stride, i), static_cast<const S*>(a.w),
                           static_cast<const S*>(a.b), row_ptr<D>(a.y, a.y_stride, i), a.cols, a.eps,
                           a.mean ? a.mean + i : nullptr, a.rstd ? a.rstd + i : nullptr);
}

template <DType D, bool HasW>
void bwd_rows(const NormBwdArgs& a) {
#pragma omp parallel for schedule(static) if (a.nchunks > 1)
  for (int64_t c = 0; c < a.nchunks; ++c) {
    float* dwp = a.part ? a.part + c * 2 * a.cols : nullptr;
    float* dbp = dwp ? dwp + a.cols : nullptr;
    const int64_t end = chunk_begin(a.rows, a.nchunks, c + 1);
    for (int64_t i = chunk_begin(a.rows, a.nchunks, c); i < end; ++i)
      bwd_row<D, HasW>(row_ptr<D>(a.dy, a.dy_stride, i), row_ptr<D>(a.x, a.x_stride, i),
                       static_cast<const storage_t<D>*>(a.w), a.mean[i], a.rstd[i],
                       a.dx ? row_ptr<D>(a.dx, a.dx_stride, i) : nullptr, dwp, dbp, a.cols);
  }
}

}  // namespace

void layer_norm_fwd(const NormFwdArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) {
    dispatch_bool(a.w != nullptr, [&](auto hw) {
      dispatch_bool(a.b != nullptr, [&](auto hb) {
        fwd_rows<decltype(d)::value, decltype(hw)::value, decltype(hb)::value>(a);
      });
    });
  });
}

void layer_norm_bwd(const NormBwdArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) {
    dispatch_bool(a.w != nullptr, [&](auto hw) { bwd_rows<decltype(d)::value, decltype(hw)::value>(a); });
  });
}

}  // namespace fastllm::cpu::avx2
