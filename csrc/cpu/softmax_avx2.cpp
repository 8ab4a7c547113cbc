// AVX2/FMA path of softmax_fwd / softmax_bwd (entry points in kernels.h, math in ops.h).
// One row at a time per thread, fp32 accumulation, exp8() from vec_avx2.h.
#include <cfloat>
#include <cmath>

#include "kernels.h"
#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

// Rows up to this length keep their fp32 exp values in a stack buffer (in L1/L2) between the
// passes; longer rows use the online path.
constexpr int64_t kCachedCols = 16384;
// Block length of the online path: a block is read from memory once and re-read from L1.
constexpr int64_t kOnlineBlock = 2048;

inline __m256 max4(const __m256 (&a)[4]) {
  return _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
}

// Row max of x (lanes past the end count as -inf), NaN-agnostic: a NaN in x makes the sum of
// exponentials NaN later, which is what turns the whole row into NaN (as in torch).
template <DType D>
__m256 lane_max(const storage_t<D>* x, int64_t n, __m256 init) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 mx[4] = {init, init, init, init};
  for_blocks(n, [&](int64_t j, auto len, int k) {
    mx[k] = _mm256_max_ps(mx[k], keep(load<D>(x + j, len), len, ninf));
  });
  return max4(mx);
}

// sum over [0, n) of f(j, len, k) (for_blocks' arguments). exp8 leaves registers for one
// accumulator only (a spilled one would put a store-load on every add), so each chunk of
// kSumChunk elements is summed in a register and the chunk sums are added up: no lane adds a
// long run of tiny terms to a large sum, where they would be rounded away.
template <class F>
inline __m256 chunked_sum(int64_t n, F&& f) {
  constexpr int64_t kSumChunk = 512;
  __m256 total = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; c += kSumChunk) {
    __m256 acc = _mm256_setzero_ps();
    for_blocks(n - c < kSumChunk ? n - c : kSumChunk,
               [&](int64_t j, auto len, int k) { acc = _mm256_add_ps(acc, f(c + j, len, k)); });
    total = _mm256_add_ps(total, acc);
  }
  return total;
}

// Cached path: m = max(x); e = exp(x - m) (fp32, kept in a stack buffer); y = e * (1 / sum(e)).
// A row of all -inf gives exp(-inf - -inf) = NaN, and +inf gives inf - inf = NaN, as in torch.
// The next row is prefetched during the exp pass, which has the most arithmetic per element.
template <DType D>
void fwd_row_cached(const storage_t<D>* x, storage_t<D>* y, int64_t n, const storage_t<D>* next) {
  const __m256 m = _mm256_set1_ps(hmax(lane_max<D>(x, n, _mm256_set1_ps(-INFINITY))));
  alignas(32) float e[kCachedCols];
  const __m256 sum = chunked_sum(n, [&](int64_t j, auto len, int k) {
    if (k == 0) prefetch32(next + j);
    return store<DType::F32>(e + j, keep(exp8(_mm256_sub_ps(load<D>(x + j, len), m)), len), len);
  });
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
  for_blocks(n, [&](int64_t j, auto len, int) {
    store<D>(y + j, _mm256_mul_ps(load<DType::F32>(e + j, len), inv), len);
  });
}

// Online path, two passes over memory. Pass 1 keeps a running max m and sum s per lane; for each
// block: m' = max(m, block max), s = s * exp(m - m') + sum_block exp(x - m'). Then
// M = max_l m_l, S = sum_l s_l * exp(m_l - M), and pass 2 writes y = exp(x - M) / S.
// m starts at -FLT_MAX (not -inf) so lanes that only see -inf keep s = 0 instead of NaN.
template <DType D>
void fwd_row_online(const storage_t<D>* x, storage_t<D>* y, int64_t n) {
  const __m256 lowest = _mm256_set1_ps(-FLT_MAX);
  __m256 m = lowest, s = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < n; b0 += kOnlineBlock) {
    const int64_t bn = n - b0 < kOnlineBlock ? n - b0 : kOnlineBlock;
    const storage_t<D>* xb = x + b0;
    const __m256 mn = _mm256_max_ps(m, lane_max<D>(xb, bn, lowest));
    const __m256 block_sum = chunked_sum(bn, [&](int64_t j, auto len, int) {
      return keep(exp8(_mm256_sub_ps(load<D>(xb + j, len), mn)), len);
    });
    s = _mm256_fmadd_ps(s, exp8(_mm256_sub_ps(m, mn)), block_sum);
    m = mn;
  }
  const float big_m = hmax(m);
  const __m256 mv = _mm256_set1_ps(big_m);
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(_mm256_mul_ps(s, exp8(_mm256_sub_ps(m, mv)))));
  for_blocks(n, [&](int64_t j, auto len, int) {
    store<D>(y + j, _mm256_mul_ps(exp8(_mm256_sub_ps(load<D>(x + j, len), mv)), inv), len);
  });
}

// The fp32 lanes [0, 4) and [4, 8) of `len` elements at p, widened to fp64.
template <DType D, class L>
inline void load_f64(const storage_t<D>* p, L len, __m256d& lo, __m256d& hi) {
  if constexpr (D == DType::F32 && is_full<L>) {  // vcvtps2pd straight from memory
    lo = _mm256_cvtps_pd(_mm_loadu_ps(p));
    hi = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
  } else {
    const __m256 v = load<D>(p, len);
    lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  }
}

// dx = y * (dy - sum(dy * y)). dy - dot cancels where dy is close to dot, leaving the dot's own
// rounding error as most of dx's error. fp32 inputs: the dot is accumulated in fp64 (exact products).
// bf16 and fp16 inputs: their products are exact in fp32 already (8 + 8 or 11 + 11 significant bits), so
// fp32 FMAs with 32 partial sums, as torch sums them: the error stays within torch's (RMS 0.93-1.03x its
// error over 1000-262147 columns, cancelling rows included), the fp64 dot's was lower (1024 x 1024 bf16 on a
// 2-core Zen 4: 29 -> 46 GB/s, the widening to fp64 was most of the time).
template <DType D>
float row_dot(const storage_t<D>* y, const storage_t<D>* dy, int64_t n) {
  if constexpr (D == DType::F32) {
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for_blocks(n, [&](int64_t j, auto len, int k) {
      __m256d a_lo, a_hi, b_lo, b_hi;
      load_f64<D>(dy + j, len, a_lo, a_hi);
      load_f64<D>(y + j, len, b_lo, b_hi);
      acc[k] = _mm256_fmadd_pd(a_hi, b_hi, _mm256_fmadd_pd(a_lo, b_lo, acc[k]));
    });
    const __m256d s = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));
    return static_cast<float>(_mm_cvtsd_f64(h));
  } else {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for_blocks(n, [&](int64_t j, auto len, int k) {
      acc[k] = _mm256_fmadd_ps(load<D>(dy + j, len), load<D>(y + j, len), acc[k]);
    });
    return hsum4(acc);
  }
}

template <DType D>
void bwd_row(const storage_t<D>* y, const storage_t<D>* dy, storage_t<D>* dx, int64_t n) {
  const __m256 dot = _mm256_set1_ps(row_dot<D>(y, dy, n));
  for_blocks(n, [&](int64_t j, auto len, int) {
    store<D>(dx + j, _mm256_mul_ps(load<D>(y + j, len), _mm256_sub_ps(load<D>(dy + j, len), dot)), len);
  });
}

template <DType D>
void fwd_rows(const RowArgs& a) {
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i) {
    const storage_t<D>* x = row_ptr<D>(a.a, a.a_stride, i);
    storage_t<D>* y = row_ptr<D>(a.out, a.out_stride, i);
    if (a.cols <= kCachedCols)
      fwd_row_cached<D>(x, y, a.cols, row_ptr<D>(a.a, a.a_stride, i + 1 < a.rows ? i + 1 : i));
    else
      fwd_row_online<D>(x, y, a.cols);
  }
}

template <DType D>
void bwd_rows(const RowArgs& a) {
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t i = 0; i < a.rows; ++i)
    bwd_row<D>(row_ptr<D>(a.a, a.a_stride, i), row_ptr<D>(a.b, a.b_stride, i),
               row_ptr<D>(a.out, a.out_stride, i), a.cols);
}

}  // namespace

void softmax_fwd(const RowArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) { fwd_rows<decltype(d)::value>(a); });
}

void softmax_bwd(const RowArgs& a) {
  dispatch_dtype(a.dt, [&](auto d) { bwd_rows<decltype(d)::value>(a); });
}

}  // namespace fastllm::cpu::avx2
