// AVX2/FMA/F16C path of qmatmul (the math is in qmatmul.cpp's header comment); float activations
// from kGemmMinM rows on go to the GEMM of qmatmul_gemm_avx2.cpp instead. Output channels are split
// over the OpenMP threads; each weight row is read once and used for up to kQRows rows of x per pass
// (the row stays in L1 for the next pass). Per block of 32 weights:
//   float mode: the block is dequantised exactly into 4 x 8 floats (int4: one 16-byte load,
//     shift, mask) and FMA'd with x; per-channel int8 applies its row scale to the final sum.
//   int8 mode: integer dot products llama.cpp-style: maddubs (u8 x s8 -> pairs of s16) then
//     madd with ones (-> 8 x s32), converted and FMA'd with the block's scale dx * d.
//     int8 weights: maddubs(|w|, sign(qx, w)) = w * qx (also for w = -128: 128 as u8).
//     int4 (both): sum (u - 8) qx = madd(maddubs(u, qx) - maddubs(8, qx)), the second precomputed
//     once per call. Two blocks at a time: one 32-byte load holds blocks b and b + 1, and its low /
//     high nibbles are [b: 0-15 | b+1: 0-15] / [b: 16-31 | b+1: 16-31]; the activations are permuted
//     once per call into that order (qxp), so the two maddubs results are added in s16 (|sum| <=
//     2 * 2 * 15 * 127, and minus the correction <= 2 * 2 * 8 * 127 more), then one madd leaves block
//     b's partial sums in lanes 0-3 and block b + 1's in lanes 4-7: one conversion and one FMA (with
//     [ds_b x4, ds_b+1 x4]) per pair. int4_asym adds sum_g (m_g + 8 d_g) * sx_g once per
//     row (u d + m = (u - 8) d + (m + 8 d): centring the integer part avoids the cancellation between
//     a positive u-sum and the min term).
// No s16 pair sum can saturate: |pair| <= 2 * 128 * 127 (int8) or 2 * 15 * 127 (int4).
#include <algorithm>
#include <cstring>
#include <vector>

#include "qmatmul_avx2.h"

namespace fastllm::cpu::avx2 {
namespace {

// out[i] = x[m0 + i] . W[row] over the blocks [b0, b1), for i < MT (per-channel int8: before the row
// scale). Accumulators: 4 chains in all (per row of x: 4 / MT).
template <QFormat F, int MT>
void rows_float(const QMatmulArgs& a, const WRow& r, int64_t m0, int64_t b0, int64_t b1, float* out) {
  constexpr int NP = MT >= 4 ? 1 : 4 / MT;
  __m256 acc[MT][NP];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const float* x = a.xf + m0 * a.xf_stride;
  for (int64_t b = b0; b < b1; ++b) {
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
    out[i] = hsum(s);
  }
}

// ds[b] = dx[b] * d_g(b) for the blocks b0 <= b < b1 of one row of x (group formats; b0 % 4 == 0).
inline void block_scales(const WRow& r, const float* dx, int64_t b0, int64_t b1, float* ds) {
  const __m256i dup2 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), dup4 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  int64_t b = b0;
  for (; b + 8 <= b1; b += 8) {
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
  for (; b < b1; ++b) ds[b] = dx[b] * h2f(r.s16[b >> r.gshift]);
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

// Activations of the int4 int8-mode kernel, prepared once per call: qxp is qx with each pair of
// blocks reordered to (b: 0-15, b+1: 0-15, b: 16-31, b+1: 16-31) (an odd last block stays as it is),
// c8 holds per pair (or last block) the 16 s16 lanes of the sum of maddubs(8, .) over its 32-byte halves.
struct Int4Acts {
  std::vector<int8_t> qxp;
  std::vector<int16_t> c8;
  int64_t npairs, nunits;  // pairs of blocks; units = pairs + (odd last block)
};

inline __m256i maddubs8(__m256i qx) { return _mm256_maddubs_epi16(_mm256_set1_epi8(8), qx); }

Int4Acts prepare_int4(const QMatmulArgs& a) {
  const int64_t k = a.k, nb = k / kBlock;
  Int4Acts p{std::vector<int8_t>(a.m * k), std::vector<int16_t>(a.m * ((nb + 1) / 2) * 16), nb / 2, (nb + 1) / 2};
  for (int64_t i = 0; i < a.m; ++i) {
    const int8_t* src = a.qx + i * k;
    int8_t* dst = p.qxp.data() + i * k;
    int16_t* c = p.c8.data() + i * p.nunits * 16;
    for (int64_t t = 0; t < p.npairs; ++t) {
      const int8_t* s0 = src + 2 * t * kBlock;
      int8_t* d = dst + 2 * t * kBlock;
      const __m128i b0l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0));
      const __m128i b0h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 16));
      const __m128i b1l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 32));
      const __m128i b1h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + 48));
      const __m256i lo = _mm256_set_m128i(b1l, b0l), hi = _mm256_set_m128i(b1h, b0h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 32), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + t * 16), _mm256_add_epi16(maddubs8(lo), maddubs8(hi)));
    }
    if (nb % 2) {
      const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (nb - 1) * kBlock));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (nb - 1) * kBlock), last);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + p.npairs * 16), maddubs8(last));
    }
  }
  return p;
}

// Int4 formats, int8 mode, out[i] for i < MT over the blocks [b0, b1) (b0 even; an odd count only
// when b1 == nb), without the int4_asym min term; ds: kQRows * nb scratch.
template <QFormat F, int MT>
void rows_int8_i4(const QMatmulArgs& a, const WRow& r, int64_t m0, int64_t b0, int64_t b1, const Int4Acts& p,
                  float* ds, float* out) {
  const int64_t k = a.k, nb = k / kBlock;
  for (int i = 0; i < MT; ++i) block_scales(r, a.dx + (m0 + i) * nb, b0, b1, ds + i * nb);
  constexpr int NA = MT == 1 ? 2 : 1;  // independent FMA chains for a single row of x
  __m256 acc[MT][NA];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int8_t* qx = p.qxp.data() + m0 * k;
  const int16_t* c8 = p.c8.data() + m0 * p.nunits * 16;
  auto pair = [&](int64_t t, int u) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + t * 32));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    for (int i = 0; i < MT; ++i) {
      const int8_t* x = qx + i * k + t * 2 * kBlock;
      const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
      const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
      const __m256i s = _mm256_madd_epi16(
          _mm256_sub_epi16(_mm256_add_epi16(plo, phi),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c8 + (i * p.nunits + t) * 16))),
          ones);
      const __m256 sc = _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ds + i * nb + 2 * t)))),
          dup);
      acc[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[i][u]);
    }
  };
  const int64_t t1 = b1 / 2;
  int64_t t = b0 / 2;
  for (; t + NA <= t1; t += NA)
    for (int u = 0; u < NA; ++u) pair(t + u, u);
  for (; t < t1; ++t) pair(t, 0);
  if (b1 % 2) {  // the odd last block alone, in element order
    const int64_t b = nb - 1;
    const __m256i wv = int4_block(r.q, b);
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + i * k + b * kBlock));
      const __m256i s = _mm256_madd_epi16(
          _mm256_sub_epi16(_mm256_maddubs_epi16(wv, xv),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c8 + (i * p.nunits + p.npairs) * 16))),
          ones);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(ds + i * nb + b), acc[i][0]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    __m256 s = acc[i][0];
    for (int u = 1; u < NA; ++u) s = _mm256_add_ps(s, acc[i][u]);
    out[i] = hsum(s);
  }
}

// Int8 formats, int8 mode, out[i] for i < MT over the blocks [b0, b1) (per-channel: before the row
// scale); ds: kQRows * nb scratch.
template <QFormat F, int MT>
void rows_int8(const QMatmulArgs& a, const WRow& r, int64_t m0, int64_t b0, int64_t b1, float* ds, float* out) {
  const int64_t k = a.k, nb = k / kBlock;
  const float* scale = a.dx + m0 * nb;  // per-channel: dx, the row scale comes at the end
  if constexpr (F != QFormat::I8Channel) {
    for (int i = 0; i < MT; ++i) block_scales(r, a.dx + (m0 + i) * nb, b0, b1, ds + i * nb);
    scale = ds;
  }
  constexpr int NA = MT == 1 ? 2 : 1;  // independent FMA chains for a single row of x
  __m256 acc[MT][NA];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* qx = a.qx + m0 * k;
  auto step = [&](int64_t b, int u) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + b * kBlock));
    const __m256i aw = _mm256_abs_epi8(wv);
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + i * k + b * kBlock));
      const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
      const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
      acc[i][u] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(scale + i * nb + b), acc[i][u]);
    }
  };
  int64_t b = b0;
  for (; b + NA <= b1; b += NA)
    for (int u = 0; u < NA; ++u) step(b + u, u);
  for (; b < b1; ++b) step(b, 0);
  for (int i = 0; i < MT; ++i) {
    __m256 s = acc[i][0];
    for (int u = 1; u < NA; ++u) s = _mm256_add_ps(s, acc[i][u]);
    out[i] = hsum(s);
  }
}

// Output rows per tile, and the K-chunk: the driver walks a tile of kRowTile weight rows one chunk
// of K at a time, so that the chunk of every row of x (at most kChunkBytes of activations) stays in
// L1 while the tile's rows pass over it; each weight byte is still read once. Partial sums per
// (weight row, row of x) are added over the chunks. (Without chunks, 8 rows of float32 x at
// K = 4096 are 128 KiB, re-read from L2 for every weight row.)
constexpr int64_t kRowTile = 16;
constexpr int64_t kChunkBytes = 16 << 10;

// Blocks per chunk: a multiple of 4 (of the int4 pairs and of the 128 group), at least 8.
int64_t chunk_blocks(const QMatmulArgs& a) {
  const int64_t bytes_per_elem = a.int8_act ? 2 : 4;  // int8: qx plus the block scales and sums
  const int64_t elems = kChunkBytes / (std::max<int64_t>(a.m, 1) * bytes_per_elem);
  return std::max<int64_t>(8, elems / kBlock / 4 * 4);
}

template <QFormat F, bool Int8Act>
void run(const QMatmulArgs& a) {
  const int64_t k = a.k, nb = k / kBlock, ng = k / a.group, cb = chunk_blocks(a);
  Int4Acts p4{};
  if constexpr (Int8Act && kInt4<F>) p4 = prepare_int4(a);
#pragma omp parallel if (a.n * k >= kParallelMinElems)
  {
    std::vector<float> ds(Int8Act ? kQRows * nb : 0);
    std::vector<float> part(kRowTile * a.m);
    // dynamic: on a shared machine a preempted thread then delays only the tile it holds
#pragma omp for schedule(dynamic, 1)
    for (int64_t j0 = 0; j0 < a.n; j0 += kRowTile) {
      const int64_t jn = std::min(kRowTile, a.n - j0);
      std::fill(part.begin(), part.begin() + jn * a.m, 0.0f);
      for (int64_t b0 = 0; b0 < nb; b0 += cb) {
        const int64_t b1 = std::min(nb, b0 + cb);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const WRow r = weight_row<F>(a, j0 + jj);
          for (int64_t m0 = 0; m0 < a.m; m0 += kQRows) {
            const int mt = static_cast<int>(std::min<int64_t>(kQRows, a.m - m0));
            float out[kQRows];
            dispatch_rows(mt, [&](auto t) {
              constexpr int MT = decltype(t)::value;
              if constexpr (Int8Act && kInt4<F>) rows_int8_i4<F, MT>(a, r, m0, b0, b1, p4, ds.data(), out);
              else if constexpr (Int8Act) rows_int8<F, MT>(a, r, m0, b0, b1, ds.data(), out);
              else rows_float<F, MT>(a, r, m0, b0, b1, out);
            });
            for (int i = 0; i < mt; ++i) part[jj * a.m + m0 + i] += out[i];
          }
        }
      }
      for (int64_t jj = 0; jj < jn; ++jj) {
        const WRow r = weight_row<F>(a, j0 + jj);
        for (int64_t i = 0; i < a.m; ++i) {
          float v = part[jj * a.m + i];
          if constexpr (F == QFormat::I8Channel) v *= r.s32;
          if constexpr (Int8Act && F == QFormat::I4Asym) v += min_term(r.mins, r.s16, a.sx + i * ng, ng);
          store_outputs(a, i, 1, j0 + jj, &v);
        }
      }
    }
  }
}

}  // namespace

void qmatmul(const QMatmulArgs& a) {
  dispatch_qformat(a.fmt, [&](auto f) {
    if (!a.int8_act && a.m >= kGemmMinM) gemm_float<decltype(f)::value>(a);
    else if (a.int8_act) run<decltype(f)::value, true>(a);
    else run<decltype(f)::value, false>(a);
  });
}

}  // namespace fastllm::cpu::avx2
