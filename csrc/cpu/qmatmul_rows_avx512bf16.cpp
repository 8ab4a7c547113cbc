// AVX512_BF16 qmatmul kernel for up to 11 bfloat16 rows of x (decode and batched decode), int4 weights, float
// mode: vdpbf16ps multiplies 32 bfloat16 pairs per instruction and adds them in fp32. The int4 values
// u - 8 (both int4 formats) are exact in bfloat16 and so are the activations, so every product is
// exact and only the fp32 sums round: the error of an fp32 dot product over the same bfloat16 inputs.
//   Two blocks (32 bytes of weights) at a time: zero-extending their bytes gives 32 words, byte j of
//   block 2P + j / 16 each, and vpermw (which reads the low 5 bits of each word) maps a word to the
//   bfloat16 of (low nibble) - 8 through a 32-entry table (the 16 values twice, so the high nibble's
//   low bit does not matter); the words shifted right by 4 do the same for the high nibbles. The
//   activations are re-laid once per call to match: per block pair, [x0[0:16] x1[0:16]] then
//   [x0[16:32] x1[16:32]] (prepare_bf16). Lane l of the dot products then sums block 2P + l / 8
//   only, and one FMA applies the two blocks' scales d (lanes 0-7 and 8-15) to the pair's sums:
//     y = sum_b d_b sum_i (u_bi - 8) x_bi  +  sum_g (m_g + 8 d_g) sum_{i in g} x_i   (int4_asym only)
//   (centred as the int8 mode is: u d + m = (u - 8) d + (m + 8 d), so the two terms do not cancel;
//   the driver adds the second with min_term over the per-group sums of x made here).
// Range of x and non-finite scales: as the GEMM (qmatmul_gemm_avx512bf16.cpp, at the top).
// A register tile is R = 4 weight rows x up to 4 rows of x: each weight pair is expanded once for the
// rows of x, each activation load serves the 4 weight rows. One row of x does about 8 vector
// instructions per 64 weights where the fp32 path (rows_float_m1) does 18.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <algorithm>

#include "qmatmul_avx512.h"

namespace fastllm::cpu::avx512 {
namespace {

constexpr int kRows = 4;   // weight rows sharing each activation load
constexpr int kXRows = 4;  // rows of x sharing each weight expansion (more rows: passes of at most 4)
// weight rows fetched 2 passes (of kRows rows) ahead, as rows_float_m1 does
constexpr int64_t kAheadPasses = 2;

// out[r * MT + i] = x row m0 + i . W row rows[r] over all of K without the int4_asym min term.
template <int R, int MT>
void rows_bf16(const Bf16Acts& p, const WRow* rows, int64_t m, int64_t m0, int64_t nb, double* out) {
  const uint8_t* q[R];
  const float* d[R];
  for (int r = 0; r < R; ++r) q[r] = rows[r].q, d[r] = rows[r].d;
  const int gshift = rows[0].gshift;
  // bfloat16 of (i % 16) - 8 for i < 32 (exact)
  const __m512 v = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(v, v);
  constexpr int NA = MT == 1 ? 2 : 1;  // FMA chains per (r, i): one row of x alternates two
  __m512 acc[R][MT][NA];
  for (auto& row : acc)
    for (auto& c : row)
      for (auto& v : c) v = _mm512_setzero_ps();
  const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const int64_t pairs = (nb + 1) / 2, full = nb / 2;
  auto pair = [&](int64_t P, int u, auto partial) {
    const uint16_t* x = p.xk.data() + (P * m + m0) * 64;
    for (int r = 0; r < R; ++r) {
      __m256i raw;
      __m512 dv;
      if constexpr (decltype(partial)::value) {  // the last block of an odd nb: lanes 8-15 zero
        raw = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + P * 32)));
        dv = _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(d[r][(2 * P) >> gshift]));
      } else {
        raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + P * 32));
        if (gshift == 0) dv = _mm512_permutexvar_ps(half, _mm512_castps128_ps512(_mm_castpd_ps(
                                  _mm_load_sd(reinterpret_cast<const double*>(d[r] + 2 * P)))));
        else dv = _mm512_set1_ps(d[r][(2 * P) >> gshift]);
      }
      const __m512i w = _mm512_cvtepu8_epi16(raw);
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(w, table);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
      for (int i = 0; i < MT; ++i) {
        const __m512bh xl = (__m512bh)_mm512_loadu_si512(x + i * 64), xh = (__m512bh)_mm512_loadu_si512(x + i * 64 + 32);
        const __m512 s = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), lo, xl), hi, xh);
        acc[r][i][u % NA] = _mm512_fmadd_ps(s, dv, acc[r][i][u % NA]);
      }
    }
  };
  const int64_t ahead = kAheadPasses * R * nb * 16;
  int64_t P = 0;
  for (; P + 2 <= full; P += 2) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q[r] + ahead + P * 32), _MM_HINT_T0);
    pair(P, 0, std::false_type{});
    pair(P + 1, 1, std::false_type{});
  }
  int u = 0;
  for (; P < full; ++P, u ^= 1) pair(P, u, std::false_type{});
  if (P < pairs) pair(P, u, std::true_type{});
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i)
      out[r * MT + i] = reduce_to_double(NA == 1 ? acc[r][i][0] : _mm512_add_ps(acc[r][i][0], acc[r][i][NA - 1]));
}

}  // namespace

Bf16Acts prepare_bf16(const QMatmulArgs& a) {
  const int64_t nb = a.k / kBlock, pairs = (nb + 1) / 2, ng = a.k / a.group;
  Bf16Acts p{std::vector<uint16_t>(pairs * a.m * 64, 0), std::vector<float>(a.m * ng, 0.0f)};
  for (int64_t i = 0; i < a.m; ++i) {
    const uint16_t* x = a.xbf + i * a.xf_stride;
    for (int64_t b = 0; b < nb; ++b) {
      uint16_t* dst = p.xk.data() + ((b / 2) * a.m + i) * 64 + (b % 2) * 16;
      std::copy(x + b * kBlock, x + b * kBlock + 16, dst);
      std::copy(x + b * kBlock + 16, x + b * kBlock + 32, dst + 32);
    }
    if (a.fmt == QFormat::I4Asym)
      for (int64_t c = 0; c < a.k; ++c) p.sxg[i * ng + c / a.group] += bf16_to_float(x[c]);
  }
  return p;
}

void tile_bf16(const Bf16Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t m, double* part) {
  auto rows_for = [](auto) { return std::integral_constant<int, kRows>{}; };
  for_register_tiles<kXRows>(jn, m, part, rows_for, [&](auto r, auto mt, int64_t m0, int64_t jj, double* out) {
    rows_bf16<r, mt>(p, rows + jj, m, m0, nb, out);
  });
}

}  // namespace fastllm::cpu::avx512
