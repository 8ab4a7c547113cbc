// AVX2/FMA/F16C path of qmatmul (the math is in qmatmul.cpp's header comment). Output channels
// are split over the OpenMP threads; each weight row is read once and used for up to kQRows rows
// of x per pass (the row stays in L1 for the next pass). Per block of 32 weights:
//   float mode: the block is dequantised exactly into 4 x 8 floats (int4: one 16-byte load,
//     shift, mask) and FMA'd with x; per-channel int8 applies its row scale to the final sum.
//   int8 mode: integer dot products llama.cpp-style: maddubs (u8 x s8 -> pairs of s16) then
//     madd with ones (-> 8 x s32), converted and FMA'd with the block's scale dx * d.
//     int8 weights: maddubs(|w|, sign(qx, w)) = w * qx (also for w = -128: 128 as u8).
//     int4: sum (u - 8) qx = maddubs(u, qx) - maddubs(8, qx), the second precomputed once per call.
//     int4_asym: the same sum, plus sum_g (m_g + 8 d_g) * sx_g once per row (u d + m = (u - 8) d +
//     (m + 8 d): centring the integer part avoids the cancellation between a positive u-sum and
//     the min term).
// No s16 pair sum can saturate: |pair| <= 2 * 128 * 127 (int8) or 2 * 15 * 127 (int4).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

constexpr int64_t kBlock = 32;

template <QFormat F>
constexpr bool kInt4 = F == QFormat::I4 || F == QFormat::I4Asym;

// One weight row: packed values, scales (f16 per group, or the f32 row scale), mins.
struct WRow {
  const uint8_t* q;
  const uint16_t* s16;
  float s32;
  const uint16_t* mins;
  int gshift;  // the group of block b is b >> gshift
};

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// The 32 values of int4 block b as bytes u in [0, 15], in element order.
inline __m256i int4_block(const uint8_t* row, int64_t b) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

template <QFormat F>
inline __m256i int_block(const uint8_t* row, int64_t b) {
  if constexpr (kInt4<F>) return int4_block(row, b);
  else return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
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

// out[i] = x[m0 + i] . W[row] for i < MT. Accumulators: 4 chains in all (per row of x: 4 / MT).
template <QFormat F, int MT>
void rows_float(const QMatmulArgs& a, const WRow& r, int64_t m0, float* out) {
  constexpr int NP = MT >= 4 ? 1 : 4 / MT;
  __m256 acc[MT][NP];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const int64_t nb = a.k / kBlock;
  const float* x = a.xf + m0 * a.xf_stride;
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w[4];
    dequant_block<F>(r, b, w);
    for (int i = 0; i < MT; ++i) {
      const float* xi = x + i * a.xf_stride + b * kBlock;
      for (int j = 0; j < 4; ++j) acc[i][j % NP] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xi + 8 * j), acc[i][j % NP]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    __m256 s = acc[i][0];
    for (int p = 1; p < NP; ++p) s = _mm256_add_ps(s, acc[i][p]);
    out[i] = F == QFormat::I8Channel ? hsum(s) * r.s32 : hsum(s);
  }
}

// ds[b] = dx[b] * d_g(b) for the nb blocks of one row of x (group formats).
inline void block_scales(const WRow& r, const float* dx, int64_t nb, float* ds) {
  const __m256i dup2 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), dup4 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const uint16_t* sp = r.s16 + (b >> r.gshift);
    __m256 s;
    if (r.gshift == 0) {
      s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp)));
    } else if (r.gshift == 1) {
      s = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp))), dup2);
    } else {
      int32_t two;
      std::memcpy(&two, sp, 4);
      s = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_cvtsi32_si128(two)), dup4);
    }
    _mm256_storeu_ps(ds + b, _mm256_mul_ps(_mm256_loadu_ps(dx + b), s));
  }
  for (; b < nb; ++b) ds[b] = dx[b] * h2f(r.s16[b >> r.gshift]);
}

// sum_g (mins[g] + 8 scales[g]) * sx[g].
inline float min_term(const uint16_t* mins, const uint16_t* scales, const float* sx, int64_t ng) {
  auto ld = [](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8)
    acc = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), ld(scales + g), ld(mins + g)), _mm256_loadu_ps(sx + g),
                          acc);
  float s = hsum(acc);
  for (; g < ng; ++g) s += (h2f(mins[g]) + 8.0f * h2f(scales[g])) * sx[g];
  return s;
}

// Int8 mode, out[i] for i < MT. p8: maddubs(8, qx) per block (int4 only); ds: kQRows * nb scratch.
template <QFormat F, int MT>
void rows_int8(const QMatmulArgs& a, const WRow& r, int64_t m0, const int16_t* p8, float* ds, float* out) {
  const int64_t k = a.k, nb = k / kBlock;
  const float* scale = a.dx + m0 * nb;  // per-channel: dx, the row scale comes at the end
  if constexpr (F != QFormat::I8Channel) {
    for (int i = 0; i < MT; ++i) block_scales(r, a.dx + (m0 + i) * nb, nb, ds + i * nb);
    scale = ds;
  }
  constexpr int NA = MT == 1 ? 2 : 1;  // independent FMA chains for a single row of x
  __m256 acc[MT][NA];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* qx = a.qx + m0 * k;
  auto step = [&](int64_t b, int u) {
    const __m256i wv = int_block<F>(r.q, b);
    __m256i aw;
    if constexpr (!kInt4<F>) aw = _mm256_abs_epi8(wv);
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + i * k + b * kBlock));
      __m256i p;
      if constexpr (kInt4<F>) p = _mm256_maddubs_epi16(wv, xv);
      else p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
      if constexpr (kInt4<F>)
        p = _mm256_sub_epi16(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p8 + ((m0 + i) * nb + b) * 16)));
      const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
      acc[i][u] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(scale + i * nb + b), acc[i][u]);
    }
  };
  int64_t b = 0;
  for (; b + NA <= nb; b += NA)
    for (int u = 0; u < NA; ++u) step(b + u, u);
  for (; b < nb; ++b) step(b, 0);
  const int64_t ng = k / a.group;
  for (int i = 0; i < MT; ++i) {
    __m256 s = acc[i][0];
    for (int u = 1; u < NA; ++u) s = _mm256_add_ps(s, acc[i][u]);
    float v = hsum(s);
    if constexpr (F == QFormat::I8Channel) v *= r.s32;
    if constexpr (F == QFormat::I4Asym) v += min_term(r.mins, r.s16, a.sx + (m0 + i) * ng, ng);
    out[i] = v;
  }
}

template <QFormat F, bool Int8Act>
void run(const QMatmulArgs& a) {
  const int64_t k = a.k, nb = k / kBlock, ng = k / a.group;
  std::vector<int16_t> p8;
  if constexpr (Int8Act && kInt4<F>) {
    p8.resize(a.m * nb * 16);
    const __m256i eight = _mm256_set1_epi8(8);
    for (int64_t t = 0; t < a.m * nb; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p8.data() + t * 16),
                          _mm256_maddubs_epi16(eight, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qx + t * kBlock))));
  }
  const int gshift = F == QFormat::I8Channel ? 0 : __builtin_ctzll(static_cast<uint64_t>(a.group / kBlock));
  const auto* w = static_cast<const uint8_t*>(a.w);
  const int64_t row_bytes = kInt4<F> ? k / 2 : k;
#pragma omp parallel if (a.n * k >= kParallelMinElems)
  {
    std::vector<float> ds(Int8Act ? kQRows * nb : 0);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < a.n; ++j) {
      WRow r{w + j * row_bytes, nullptr, 0.0f, nullptr, gshift};
      if constexpr (F == QFormat::I8Channel) r.s32 = static_cast<const float*>(a.scales)[j];
      else r.s16 = static_cast<const uint16_t*>(a.scales) + j * ng;
      if constexpr (F == QFormat::I4Asym) r.mins = a.mins + j * ng;
      for (int64_t m0 = 0; m0 < a.m; m0 += kQRows) {
        const int mt = static_cast<int>(std::min<int64_t>(kQRows, a.m - m0));
        float out[kQRows];
        dispatch_rows(mt, [&](auto t) {
          constexpr int MT = decltype(t)::value;
          if constexpr (Int8Act) rows_int8<F, MT>(a, r, m0, p8.data(), ds.data(), out);
          else rows_float<F, MT>(a, r, m0, out);
        });
        store_outputs(a, m0, mt, j, out);
      }
    }
  }
}

}  // namespace

void qmatmul(const QMatmulArgs& a) {
  dispatch_qformat(a.fmt, [&](auto f) {
    if (a.int8_act) run<decltype(f)::value, true>(a);
    else run<decltype(f)::value, false>(a);
  });
}

}  // namespace fastllm::cpu::avx2
