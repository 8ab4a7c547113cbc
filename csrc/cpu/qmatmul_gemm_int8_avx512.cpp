// AVX-512 int8-mode qmatmul for many rows of x (prefill): a register-blocked GEMM in the manner of BLIS
// (run_gemm in qmatmul_gemm.h drives it), with VNNI integer dot products. The activations are packed once per
// call into panels of MR rows; per K chunk a tile's weight rows are unpacked into int8 buffers the
// micro-kernel reads, which then runs for every panel of x and every micro-tile of NR weight rows. It sums a
// chunk from zero in fp32 and adds it into the tile's outputs in double; the result times the per-channel
// int8 row scale, plus bias, is rounded to the output dtype once. The math is qmatmul.cpp's int8 mode:
// per block b of 32, s_b = sum_i w'_i qx_i (w' = q for int8 weights, u - 8 for both int4 formats), and
// y = sum_b s_b dx_b d_g(b) (per-channel int8: times the row scale at the end), plus for int4_asym
// sum_g (m_g + 8 d_g) sx_g.
//   x: qx + 128 as bytes, packed per panel of MR = 16 MV rows in quads of k: panel p holds byte e of
//     quad c (k = 4 c + e) of row r at xq[p * K * MR + (c * MR + r) * 4 + e], so that vpdpbusd (u8 x
//     s8, 4 products per 32-bit lane) with one quad of a weight row broadcast adds 4 products into
//     each row's lane. The unsigned +128 comes back out as -128 sum_i w'_i, where each block's
//     integer sums start. dx and sx are packed per panel as [block or group][r] floats.
//   The tile's weights are unpacked per chunk into w' bytes in element order (wq), with per row and
//     block the start value -128 sum w' (wi), the scale d (wd; 1 for per-channel int8) and, on a
//     group's first block, m + 8 d (int4_asym, wc).
//   The micro-kernel: MV x NR = 12 integer sums (reset per block) and 12 fp32 sums (over the chunk,
//     then added in double); per block 8 vpdpbusd per sum, then f += float(s) dx d.
//   Integer range: |s_b| <= 32 * 255 * 128 plus |start| <= 128 * 32 * 128.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qmatmul_avx512.h"
#include "qmatmul_gemm.h"

namespace fastllm::cpu::avx512 {
namespace {

constexpr int64_t kQuads = kBlock / 4;  // quads of k per block

template <QFormat F, int MV>
struct GemmInt8 {
  static constexpr int64_t MR = 16 * MV, KC = 1024;  // a panel's chunk of x: 32 KiB at MV = 2
  static constexpr int NR = 12 / MV;
  const QMatmulArgs& a;
  const Panels panels;
  const int64_t nb, ng, chunk_blocks;
  std::vector<uint8_t> xq;
  std::vector<float> dxt, sxt;

  explicit GemmInt8(const QMatmulArgs& args)
      : a(args), panels(args.m, MR, MR), nb(args.k / kBlock), ng(args.k / args.group),
        chunk_blocks(equal_chunk_blocks(nb, KC)), xq(panels.padded * args.k), dxt(panels.padded * nb),
        sxt(F == QFormat::I4Asym ? panels.padded * ng : 0) {}

  void pack(int64_t p) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(xq.data() + p * a.k * MR);
    const int8_t* src[MR];  // the panel's rows of qx (null: padding)
    for (int64_t r = 0; r < MR; ++r) src[r] = p * MR + r < a.m ? a.qx + (p * MR + r) * a.k : nullptr;
    for (int64_t c = 0; c < a.k / 4; ++c) {  // quad by quad: the stores are sequential
      for (int64_t r = 0; r < MR; ++r) {
        uint32_t v = 0;
        if (src[r]) std::memcpy(&v, src[r] + 4 * c, 4);
        dst[c * MR + r] = v ^ 0x80808080u;  // qx + 128 (padding rows: 128 against weights, with dx = 0)
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t i = p * MR + r;
      const bool real = i < a.m;
      for (int64_t b = 0; b < nb; ++b) dxt[(p * nb + b) * MR + r] = real ? a.dx[i * nb + b] : 0.0f;
      if constexpr (F == QFormat::I4Asym)
        for (int64_t g = 0; g < ng; ++g) sxt[(p * ng + g) * MR + r] = real ? a.sx[i * ng + g] : 0.0f;
    }
  }

  struct Tile {
    const GemmInt8& g;
    int64_t wsb, cb;  // wq's row stride in bytes; blocks per chunk (the other buffers' row stride)
    int64_t jn = 0, jpad = 0;
    int gmask = 0;    // block b starts a group when (b & gmask) == 0
    std::vector<int8_t> wq;
    std::vector<int32_t> wi;
    std::vector<float> wd, wc, fs;
    WRow rows[kGemmTileRows];
    // (wq's rows are 64 bytes longer than the chunk: rows chunk * 32 bytes apart would alias in L1)
    explicit Tile(const GemmInt8& gemm)
        : g(gemm), wsb(gemm.chunk_blocks * kBlock + 64), cb(gemm.chunk_blocks), wq(kGemmTileRows * wsb, 0),
          wi(kGemmTileRows * cb, 0), wd(kGemmTileRows * cb, 0.0f),
          wc(F == QFormat::I4Asym ? kGemmTileRows * cb : 0, 0.0f),
          fs(tile_scale_floats<F>(kGemmTileRows, gemm.ng), 0.0f) {}

    void start(int64_t j0, int64_t rows_in_tile) {
      jn = rows_in_tile, jpad = (jn + NR - 1) / NR * NR;
      tile_rows<F>(g.a, j0, jn, kGemmTileRows, fs.data(), rows);
      gmask = (1 << rows[0].gshift) - 1;
      std::fill(wq.begin() + jn * wsb, wq.begin() + jpad * wsb, int8_t(0));  // padding rows: zero weights
      std::fill(wi.begin() + jn * cb, wi.begin() + jpad * cb, 0);
      std::fill(wd.begin() + jn * cb, wd.begin() + jpad * cb, 0.0f);
      if constexpr (F == QFormat::I4Asym) std::fill(wc.begin() + jn * cb, wc.begin() + jpad * cb, 0.0f);
    }

    void load(int64_t b0, int64_t b1) {
      const __m256i eight = _mm256_set1_epi8(8), low = _mm256_set1_epi8(0x0F), c128 = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int64_t jj = 0; jj < jn; ++jj) {
        const WRow& r = rows[jj];
        for (int64_t b = b0; b < b1; ++b) {
          __m256i u;  // the block's w' + 8 (int4: u) or w' + 128 (int8), unsigned, in element order
          int32_t bias;
          if constexpr (kInt4<F>) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + b * 16));
            u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq.data() + jj * wsb + (b - b0) * kBlock), _mm256_sub_epi8(u, eight));
            bias = 8 * kBlock;
          } else {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + b * kBlock));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq.data() + jj * wsb + (b - b0) * kBlock), v);
            u = _mm256_xor_si256(v, c128);
            bias = 128 * kBlock;
          }
          const __m256i sad = _mm256_sad_epu8(u, _mm256_setzero_si256());  // 4 partial sums of u
          const int32_t su = static_cast<int32_t>(_mm256_extract_epi64(sad, 0) + _mm256_extract_epi64(sad, 1) +
                                                  _mm256_extract_epi64(sad, 2) + _mm256_extract_epi64(sad, 3));
          const int64_t o = jj * cb + (b - b0);
          wi[o] = -128 * (su - bias);
          wd[o] = F == QFormat::I8Channel ? 1.0f : r.d[b >> r.gshift];
          if constexpr (F == QFormat::I4Asym)
            wc[o] = (b & gmask) == 0 ? std::fma(8.0f, r.d[b >> r.gshift], r.m[b >> r.gshift]) : 0.0f;
        }
      }
    }

    void panel(int64_t p, int64_t b0, int64_t b1, double* ct, int64_t ldc) const {
      for (int64_t jj = 0; jj < jpad; jj += NR) g.micro(*this, p, jj, b0, b1, ct + jj * ldc, ldc);
    }
  };

  void micro(const Tile& t, int64_t p, int64_t jj, int64_t b0, int64_t b1, double* ct, int64_t ldc) const {
    __m512 acc[NR][MV];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    const uint8_t* x = xq.data() + (p * a.k + b0 * kBlock) * MR;
    const int8_t* w = t.wq.data() + jj * t.wsb;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b - b0;
      __m512i s[NR][MV];
      for (int j = 0; j < NR; ++j) {
        const __m512i start = _mm512_set1_epi32(t.wi[(jj + j) * t.cb + o]);
        for (int h = 0; h < MV; ++h) s[j][h] = start;
      }
      for (int64_t c = 0; c < kQuads; ++c) {
        __m512i xv[MV];
        for (int h = 0; h < MV; ++h) xv[h] = _mm512_loadu_si512(x + ((o * kQuads + c) * MR + 16 * h) * 4);
        for (int j = 0; j < NR; ++j) {
          int32_t quad;
          std::memcpy(&quad, w + j * t.wsb + o * kBlock + 4 * c, 4);
          const __m512i wv = _mm512_set1_epi32(quad);
          for (int h = 0; h < MV; ++h) s[j][h] = _mm512_dpbusd_epi32(s[j][h], xv[h], wv);
        }
      }
      __m512 dxv[MV];
      for (int h = 0; h < MV; ++h) dxv[h] = _mm512_loadu_ps(dxt.data() + (p * nb + b) * MR + 16 * h);
      for (int j = 0; j < NR; ++j) {
        const __m512 d = _mm512_set1_ps(t.wd[(jj + j) * t.cb + o]);
        for (int h = 0; h < MV; ++h) {
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s[j][h]), dxv[h]);
          if constexpr (F == QFormat::I8Channel) acc[j][h] = _mm512_add_ps(f, acc[j][h]);
          else acc[j][h] = _mm512_fmadd_ps(f, d, acc[j][h]);
        }
      }
      if constexpr (F == QFormat::I4Asym) {
        if ((b & t.gmask) == 0) {  // the min term of the group b starts
          const int64_t g = b >> __builtin_ctz(static_cast<unsigned>(t.gmask + 1));
          __m512 sxv[MV];
          for (int h = 0; h < MV; ++h) sxv[h] = _mm512_loadu_ps(sxt.data() + (p * ng + g) * MR + 16 * h);
          for (int j = 0; j < NR; ++j) {
            const __m512 cm = _mm512_set1_ps(t.wc[(jj + j) * t.cb + o]);
            for (int h = 0; h < MV; ++h) acc[j][h] = _mm512_fmadd_ps(sxv[h], cm, acc[j][h]);
          }
        }
      }
    }
    add_to_double<NR, MV>(acc, ct, ldc);
  }
};

}  // namespace

template <QFormat F>
void gemm_int8(const QMatmulArgs& a) {
  if (in_row_passes(a, [](const QMatmulArgs& p) { gemm_int8<F>(p); })) return;  // (panels chosen per pass)
  if (a.m <= 16) run_gemm<F, GemmInt8<F, 1>>(a);  // one-vector panels
  else run_gemm<F, GemmInt8<F, 2>>(a);
}

template void gemm_int8<QFormat::I8Channel>(const QMatmulArgs&);
template void gemm_int8<QFormat::I8Group>(const QMatmulArgs&);
template void gemm_int8<QFormat::I4>(const QMatmulArgs&);
template void gemm_int8<QFormat::I4Asym>(const QMatmulArgs&);

}  // namespace fastllm::cpu::avx512
