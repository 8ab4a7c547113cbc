// AVX512_BF16 float-mode qmatmul for many bfloat16 rows of x (prefill), int4 weights: a register-blocked GEMM
// (run_gemm in qmatmul_gemm.h drives it) on vdpbf16ps, which multiplies pairs of bfloat16 and adds both
// products into an fp32 lane (32 products per instruction, twice the fp32 FMA's). The int4 values u - 8 and
// the activations are exact in bfloat16, so each product is exact and only the fp32 sums round. Per block b
// of 32 along K:
//   y[i, j] = sum_b d_jb sum_{c in b} (u_jc - 8) x_ic  +  sum_b (m_jb + 8 d_jb) sum_{c in b} x_ic  (int4_asym)
// (centred as the int8 mode is, so the two terms do not cancel).
//   x is packed once per call into panels of 16 MV rows (MV = 2; the last panel MV = 1 when at most 16
//     rows are left): for each pair of elements (2p, 2p + 1) of K, 16 MV dwords, one per row (rows past m
//     are zeros), so a pair step is MV vector loads; and per block and row the sum of x (int4_asym).
//   Per K chunk (kKC blocks) a tile's weight rows are dequantised into
//     wd as bfloat16 u - 8 in K order (a block's low nibbles are its elements 0-15, the high ones 16-31) with
//     their block scales (and centred mins), then for every panel and micro-tile of NR weight rows runs the
//     micro-kernel: MV x NR lanes of block sums S (each pair step: MV loads of x, NR broadcast weight pairs,
//     MV NR vdpbf16ps), folded into MV x NR fp32 accumulators T with the block's scales once per block.
//   T sums a chunk in fp32 and is added into the tile's outputs in double (ct), as the AVX2 GEMM does, and the
//     result, bias included, is rounded to bfloat16 once (store_tile).
// Range: qmatmul.cpp sends only activations that are zero or 2^-119 <= |x| < 2^64 here (bf16_dot_range). A
// non-finite scale or min (QuantizedWeight refuses them; a weight changed after that) makes its output channel
// non-finite, as in the reference, though not always the same non-finite value: the scale meets block sums here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <algorithm>
#include <cstring>
#include <vector>

#include "qmatmul_avx512.h"
#include "qmatmul_gemm.h"

namespace fastllm::cpu::avx512 {
namespace {

template <int MV>
constexpr int64_t kMR = 16 * MV;
template <int MV>
constexpr int kNR = 12 / MV;     // MV NR = 12 block sums and 12 accumulators, of 32 zmm
constexpr int64_t kKC = 8;       // blocks per K chunk: a micro-tile's weights 6-12 KiB, a panel's x 16-32 KiB
constexpr int64_t kPairs = kBlock / 2;

// The panel of mr rows of x (bfloat16, row stride xs elements) from row i0: xt[p * mr + r] = the pair
// (x[i0 + r, 2p], x[i0 + r, 2p + 1]) as one dword (rows past m: zeros), and with sx non-null sx[b * mr + r] =
// the sum of block b of the row.
void pack_x(const uint16_t* x, int64_t xs, int64_t m, int64_t k, int64_t i0, int64_t mr, uint32_t* xt, float* sx) {
  const int64_t pairs = k / 2, live = std::clamp<int64_t>(m - i0, 0, mr);
  for (int64_t r = 0; r < mr; ++r) {
    const uint16_t* row = x + (i0 + r) * xs;
    if (r < live)
      for (int64_t p = 0; p < pairs; ++p) std::memcpy(xt + p * mr + r, row + 2 * p, 4);
    else
      for (int64_t p = 0; p < pairs; ++p) xt[p * mr + r] = 0;
  }
  if (!sx) return;
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t b = 0; b < k / kBlock; ++b)
    for (int64_t r0 = 0; r0 < mr; r0 += 16) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t p = b * kPairs; p < (b + 1) * kPairs; ++p) {
        const __m512i v = _mm512_loadu_si512(xt + p * mr + r0);
        s = _mm512_add_ps(s, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                                           _mm512_castsi512_ps(_mm512_and_si512(v, high))));
      }
      _mm512_storeu_ps(sx + b * mr + r0, s);
    }
}

// The blocks [b0, b1) of the weight rows [j0, j0 + jn) into wd (row jj's block b - b0 at (jj * kKC + b - b0) * 16
// dwords: bfloat16 u - 8 in K order), ds (d) and cs (m + 8 d, int4_asym) at jj * kKC + b - b0.
template <QFormat F>
void dequant_chunk(const QMatmulArgs& a, int64_t j0, int64_t jn, int64_t b0, int64_t b1, uint32_t* wd, float* ds,
                   float* cs) {
  const __m256i table = (__m256i)_mm256_cvtne2ps_pbh(  // word u: bfloat16 of u - 8 (vpermw: low 4 bits)
      _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1));
  const int64_t ng = a.k / a.group, row_bytes = a.k / 2;
  const int gshift = __builtin_ctzll(static_cast<uint64_t>(a.group / kBlock));
  for (int64_t jj = 0; jj < jn; ++jj) {
    const int64_t j = j0 + jj;
    const uint8_t* q = static_cast<const uint8_t*>(a.w) + j * row_bytes;
    const uint16_t* sc = static_cast<const uint16_t*>(a.scales) + j * ng;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t at = jj * kKC + b - b0;
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wd + at * kPairs), _mm256_permutexvar_epi16(w, table));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wd + at * kPairs + 8),
                          _mm256_permutexvar_epi16(_mm256_srli_epi16(w, 4), table));
      const float d = _cvtsh_ss(sc[b >> gshift]);  // (F16C: exact)
      ds[at] = d;
      if constexpr (F == QFormat::I4Asym) cs[at] = _cvtsh_ss(a.mins[j * ng + (b >> gshift)]) + 8.0f * d;
    }
  }
}

// ct[j * ldc + r] += sum over the chunk's nblk blocks for the micro-tile's NR weight rows (wd, ds, cs from row 0
// of the micro-tile) and the panel's MR rows (xt, sx from the chunk's first block).
template <QFormat F, int MV>
void micro(const uint32_t* xt, const float* sx, const uint32_t* wd, const float* ds, const float* cs, int64_t nblk,
           double* ct, int64_t ldc) {
  constexpr int64_t MR = kMR<MV>;
  constexpr int NR = kNR<MV>;
  __m512 t[NR][MV];
#pragma GCC unroll 12
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int h = 0; h < MV; ++h) t[j][h] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    __m512 s[NR][MV];
#pragma GCC unroll 12
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) s[j][h] = _mm512_setzero_ps();
    const uint32_t* xb = xt + b * kPairs * MR;
#pragma GCC unroll 4
    for (int64_t p = 0; p < kPairs; ++p) {
      __m512bh xv[MV];
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) xv[h] = (__m512bh)_mm512_loadu_si512(xb + p * MR + 16 * h);
#pragma GCC unroll 12
      for (int j = 0; j < NR; ++j) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(wd[(j * kKC + b) * kPairs + p]));
#pragma GCC unroll 2
        for (int h = 0; h < MV; ++h) s[j][h] = _mm512_dpbf16_ps(s[j][h], xv[h], w);
      }
    }
#pragma GCC unroll 12
    for (int j = 0; j < NR; ++j) {
      const __m512 d = _mm512_set1_ps(ds[j * kKC + b]);
#pragma GCC unroll 2
      for (int h = 0; h < MV; ++h) {
        t[j][h] = _mm512_fmadd_ps(s[j][h], d, t[j][h]);
        if constexpr (F == QFormat::I4Asym)
          t[j][h] = _mm512_fmadd_ps(_mm512_loadu_ps(sx + b * MR + 16 * h), _mm512_set1_ps(cs[j * kKC + b]), t[j][h]);
      }
    }
  }
  add_to_double<NR, MV>(t, ct, ldc);
}

template <QFormat F>
struct GemmBf16 {
  static constexpr int64_t MR = kMR<2>, chunk_blocks = kKC;
  static constexpr bool kAsym = F == QFormat::I4Asym;
  const QMatmulArgs& a;
  const Panels panels;
  const int64_t nb;
  std::vector<uint32_t> xt;
  std::vector<float> sx;

  explicit GemmBf16(const QMatmulArgs& args)
      : a(args), panels(args.m, MR, kMR<1>), nb(args.k / kBlock), xt(panels.padded * args.k / 2),
        sx(kAsym ? panels.padded * nb : 0) {}

  void pack(int64_t p) {
    pack_x(a.xbf, a.xf_stride, a.m, a.k, p * MR, panels.rows(p), xt.data() + p * MR * a.k / 2,
           kAsym ? sx.data() + p * MR * nb : nullptr);
  }

  struct Tile {
    const GemmBf16& g;
    std::vector<uint32_t> wd;
    std::vector<float> ds, cs;
    int64_t j0 = 0, jn = 0;
    explicit Tile(const GemmBf16& gemm)
        : g(gemm), wd(kGemmTileRows * kKC * kPairs, 0), ds(kGemmTileRows * kKC, 0.0f), cs(kGemmTileRows * kKC, 0.0f) {}

    void start(int64_t first, int64_t rows) {
      j0 = first, jn = rows;
      const int64_t jpad = (jn + kNR<1> - 1) / kNR<1> * kNR<1>;  // a multiple of both kNR
      std::fill(wd.begin() + jn * kKC * kPairs, wd.begin() + jpad * kKC * kPairs, 0u);  // padding rows: zero
      std::fill(ds.begin() + jn * kKC, ds.begin() + jpad * kKC, 0.0f);                  // weights and scales
      std::fill(cs.begin() + jn * kKC, cs.begin() + jpad * kKC, 0.0f);
    }

    void load(int64_t b0, int64_t b1) { dequant_chunk<F>(g.a, j0, jn, b0, b1, wd.data(), ds.data(), cs.data()); }

    void panel(int64_t p, int64_t b0, int64_t b1, double* ct, int64_t ldc) const {
      const int64_t mr = g.panels.rows(p);
      const uint32_t* xp = g.xt.data() + p * MR * g.a.k / 2 + b0 * kPairs * mr;
      const float* sp = kAsym ? g.sx.data() + p * MR * g.nb + b0 * mr : nullptr;
      for (int64_t jj = 0; jj < jn; jj += mr == MR ? kNR<2> : kNR<1>) {
        const uint32_t* w = wd.data() + jj * kKC * kPairs;
        if (mr == MR) micro<F, 2>(xp, sp, w, ds.data() + jj * kKC, cs.data() + jj * kKC, b1 - b0, ct + jj * ldc, ldc);
        else micro<F, 1>(xp, sp, w, ds.data() + jj * kKC, cs.data() + jj * kKC, b1 - b0, ct + jj * ldc, ldc);
      }
    }
  };
};

}  // namespace

template <QFormat F>
void gemm_bf16(const QMatmulArgs& a) {
  run_gemm<F, GemmBf16<F>>(a);
}

template void gemm_bf16<QFormat::I4>(const QMatmulArgs&);
template void gemm_bf16<QFormat::I4Asym>(const QMatmulArgs&);

}  // namespace fastllm::cpu::avx512
