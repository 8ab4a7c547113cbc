// AVX-512 (F/BW/VL/VNNI) path of qmatmul, chosen at run time over the AVX2 one (the math is in
// qmatmul.cpp's header comment). The weights are walked in "units" of one 64-byte load: 4 int4
// blocks (U = 4) or 2 int8 blocks (U = 2); a K that is not a multiple of U blocks ends with a masked
// load (the missing bytes read as 0 and their activations are padded with 0).
//   int8 mode, integer dot products with vpdpbusd (u8 x s8, 4 products per 32-bit lane):
//     int4: the unit's low nibbles are [b0: 0-15 | b1: 0-15 | b2: 0-15 | b3: 0-15] and its high
//       nibbles the same for elements 16-31 (formats.py's layout), so the activations are re-laid
//       once per call as 64 bytes of each (xq); u in [0, 15] is the unsigned operand and the centring
//       sum (u - 8) qx = sum u qx - 8 sum qx starts each lane at -8 * (its qx sum) (nc). Lane l then
//       holds block l / 4's partial sums: one conversion and one FMA with the lane's scale dx * d.
//     int8: vpdpbusd(qx + 128, w) = sum qx w + 128 sum w; the weight term 128 sum w (one vpdpbusd
//       with 128, shared by all rows of x) is subtracted by starting the lanes at its negation. Lane l
//       holds block l / 8's partial sums. Sums stay in int32: |lane| <= 8 * 255 * 128.
//   float mode: int4 values become floats through a 16-entry table per group, T[u] = (u - 8) d or
//     u d + m (exactly formats.py's dequantised values; vpermps indexes it with the low 4 bits of
//     each byte), int8 through a sign extension and conversion (times d, exact, for int8 groups);
//     then FMAs with x. Per-channel int8 applies its row scale to the final sum.
// int8 mode: each unit of a weight row is decoded once and used for up to kQRows rows of x; float
// mode: register tiles of 4 weight rows x up to 4 rows of x (rows_float). The driver walks a tile of
// kRowTile weight rows one chunk of K at a time so that the chunk of every row of x stays in
// L1 (as the AVX2 path does). A single row of x (decode; int8 mode, and float mode with int4 weights)
// walks kM1Rows weight rows at a time instead (qmatmul_m1_avx512.cpp), sharing each unit's activation
// loads; in float mode, int4 weights exact in fp32 (QMatmulArgs::exact) take integer dot products there too, on x
// written as five int8 digits per element where its blocks allow (rows_digits_m1). From kGemmInt8MinM rows of x
// on (prefill) the int8 mode runs the register-blocked GEMM of qmatmul_gemm_int8_avx512.cpp. The lanes' partial sums are added in double (once per output and
// chunk: the final sums are where the cancellation happens) and the result, bias included, is
// rounded to fp32 once.
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_* (a known
// false positive), once per intrinsic use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "qmatmul_avx512.h"

namespace fastllm::cpu::avx512 {
namespace {

constexpr int64_t kRowTile = 16;
constexpr int64_t kChunkBytes = 16 << 10;  // activations of one K chunk for all rows of x (L1)
// Float mode's register tile (rows_float): kFloatTileRows weight rows x up to kFloatXRows rows of x,
// 16 accumulators. Measured on a 2-core Zen 4 (SmolLM2's 576 x 3072 and 1536 x 576): 8 rows of x
// against 2 weight rows ran at 0.7-0.8x of two passes of 4 against 4 (twice the activation loads per
// FMA), so more rows of x take several passes of at most 4, as even as can be.
constexpr int kFloatTileRows = 4, kFloatXRows = 4;
// rows_float fetches the weight rows kAheadFloat register tiles ahead (the R rows it reads at once are
// R streams, which the hardware prefetcher follows poorly; see kAheadPassesFloat at m = 1).
constexpr int64_t kAheadFloat = 2;



template <QFormat F>
Acts prepare_acts(const QMatmulArgs& a) {
  constexpr int64_t U = kUnit<F>;
  const int64_t k = a.k, nb = k / kBlock, units = (nb + U - 1) / U, full = nb / U;
  Acts p{std::vector<uint8_t>(a.m * units * U * kBlock), std::vector<int32_t>(kInt4<F> ? a.m * units * 16 : 0),
         std::vector<float>(a.m * units * 16), units};
  const __m512i ones = _mm512_set1_epi8(1), c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i block_of_lane = _mm512_srli_epi32(iota, U == 4 ? 2 : 3);
  for (int64_t i = 0; i < a.m; ++i) {
    const int8_t* qx = a.qx + i * k;
    const float* dx = a.dx + i * nb;
    for (int64_t t = 0; t < full; ++t) {  // whole units: 64-byte moves
      const int64_t at = t * a.m + i;
      uint8_t* xq = p.xq.data() + at * U * kBlock;
      const __m512i v0 = _mm512_loadu_si512(qx + t * U * kBlock);
      _mm512_storeu_ps(p.dxe.data() + at * 16,
                       _mm512_permutexvar_ps(block_of_lane, _mm512_maskz_loadu_ps((1u << U) - 1, dx + t * U)));
      if constexpr (kInt4<F>) {  // blocks 0-1 in v0, 2-3 in v1; 128-bit lanes [b lo16 | b hi16]
        const __m512i v1 = _mm512_loadu_si512(qx + t * U * kBlock + 64);
        const __m512i lo = _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i hi = _mm512_shuffle_i64x2(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
        _mm512_storeu_si512(xq, lo);
        _mm512_storeu_si512(xq + 64, hi);
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
        _mm512_storeu_si512(p.nc.data() + at * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 3)));
      } else {
        _mm512_storeu_si512(xq, _mm512_xor_si512(v0, c128));
      }
    }
    for (int64_t t = full; t < units; ++t) {  // the last, partial unit: padded with zeros
      const int64_t at = t * a.m + i;
      uint8_t* xq = p.xq.data() + at * U * kBlock;
      float* dxe = p.dxe.data() + at * 16;
      if constexpr (kInt4<F>) {
        int32_t* nc = p.nc.data() + at * 16;
        for (int j = 0; j < U; ++j) {
          const int64_t b = t * U + j;
          for (int l = 0; l < 4; ++l) {
            int32_t s = 0;
            for (int e = 0; e < 4; ++e) {
              const int8_t lo = b < nb ? qx[b * kBlock + 4 * l + e] : 0, hi = b < nb ? qx[b * kBlock + 16 + 4 * l + e] : 0;
              xq[16 * j + 4 * l + e] = static_cast<uint8_t>(lo);
              xq[64 + 16 * j + 4 * l + e] = static_cast<uint8_t>(hi);
              s += lo + hi;
            }
            nc[4 * j + l] = -8 * s;
            dxe[4 * j + l] = b < nb ? dx[b] : 0.0f;
          }
        }
      } else {
        for (int64_t e = 0; e < U * kBlock; ++e) {
          const int64_t c = t * U * kBlock + e;
          xq[e] = static_cast<uint8_t>((c < k ? qx[c] : 0) + 128);
        }
        for (int l = 0; l < 16; ++l) {
          const int64_t b = t * U + l / 8;
          dxe[l] = b < nb ? dx[b] : 0.0f;
        }
      }
    }
  }
  return p;
}




// The unit's weight scales as 16 lanes (lane l: d of block t * U + l / (16 / U); 0 past the row's nb
// blocks, see unit_lanes).
template <QFormat F>
inline __m512 unit_scales(const WRow& r, int64_t t, int64_t nb) {
  constexpr int64_t U = kUnit<F>;
  const int64_t b = t * U;
  if ((int64_t(1) << r.gshift) >= U) return _mm512_set1_ps(r.d[b >> r.gshift]);  // one group
  // U = 4 with groups of 1 or 2 blocks, or U = 2 with groups of 1 block
  const int shift = (U == 4 ? 2 : 3) + r.gshift;
  const __m512i idx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift);
  return _mm512_maskz_permutexvar_ps(unit_lanes<F>(t, nb), idx, _mm512_loadu_ps(r.d + (b >> r.gshift)));
}

// int8 mode: out[i] = sum over units [t0, t1) of x row m0 + i . W row, for i < MT (per-channel
// int8: before the row scale; int4_asym: without the min term).
template <QFormat F, int MT>
void rows_int8(const QMatmulArgs& a, const Acts& p, const WRow& r, int64_t m0, int64_t t0, int64_t t1, double* out) {
  constexpr int64_t U = kUnit<F>;
  constexpr int NA = MT == 1 ? 2 : 1;  // independent FMA chains for a single row of x
  const int64_t nb = a.k / kBlock, xbytes = U * kBlock;
  __m512 acc[MT][NA];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  auto unit = [&](int64_t t, int u) {
    const __m512i w = load_unit<F>(r.q, t, nb);
    __m512 dv = _mm512_setzero_ps();
    if constexpr (F != QFormat::I8Channel) dv = unit_scales<F>(r, t, nb);
    if constexpr (kInt4<F>) {
      const __m512i lo = _mm512_and_si512(w, mask), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
      for (int i = 0; i < MT; ++i) {
        const int64_t at = t * a.m + m0 + i;
        const uint8_t* x = p.xq.data() + at * xbytes;
        __m512i s = _mm512_loadu_si512(p.nc.data() + at * 16);
        s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(x));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(x + 64));
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(p.dxe.data() + at * 16));
        acc[i][u] = _mm512_fmadd_ps(f, dv, acc[i][u]);
      }
    } else {
      const __m512i neg = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w));
      for (int i = 0; i < MT; ++i) {
        const int64_t at = t * a.m + m0 + i;
        const __m512i s = _mm512_dpbusd_epi32(neg, _mm512_loadu_si512(p.xq.data() + at * xbytes), w);
        const __m512 f = _mm512_cvtepi32_ps(s), dxe = _mm512_loadu_ps(p.dxe.data() + at * 16);
        if constexpr (F == QFormat::I8Channel) acc[i][u] = _mm512_fmadd_ps(f, dxe, acc[i][u]);
        else acc[i][u] = _mm512_fmadd_ps(_mm512_mul_ps(f, dxe), dv, acc[i][u]);
      }
    }
  };
  int64_t t = t0;
  for (; t + NA <= t1; t += NA)
    for (int u = 0; u < NA; ++u) unit(t + u, u);
  for (; t < t1; ++t) unit(t, 0);
  for (int i = 0; i < MT; ++i) {
    __m512 s = acc[i][0];
    for (int u = 1; u < NA; ++u) s = _mm512_add_ps(s, acc[i][u]);
    out[i] = reduce_to_double(s);
  }
}


// Float-mode activations: element c of row i at x[i * rs + (c / 32) * bs + c % 32]. Several rows are
// copied once per call block-major (rs = 32, bs = 32 m: the rows of a block are adjacent, as above);
// a single row is read in place.
struct FloatActs {
  std::vector<float> buf;
  const float* x;
  int64_t rs, bs;
};

FloatActs prepare_float(const QMatmulArgs& a) {
  if (a.m == 1) return {{}, a.xf, 0, kBlock};
  const int64_t nb = a.k / kBlock;
  FloatActs p{std::vector<float>(a.m * a.k), nullptr, kBlock, a.m * kBlock};
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t b = 0; b < nb; ++b)
      std::memcpy(p.buf.data() + (b * a.m + i) * kBlock, a.xf + i * a.xf_stride + b * kBlock, kBlock * sizeof(float));
  p.x = p.buf.data();
  return p;
}

// Float mode, a register tile of R weight rows x MT rows of x: out[r * MT + i] = x row m0 + i .
// W row rows[r] over the blocks [b0, b1). Each block of a weight row is dequantised once for the MT
// rows of x, and each activation load serves the R weight rows: R * MT FMAs per R dequantisations
// and MT loads (R = kFloatTileRows, MT <= kFloatXRows).
template <QFormat F, int R, int MT>
void rows_float(const FloatActs& p, const WRow* rows, int64_t m0, int64_t b0, int64_t b1, int64_t ahead, double* out) {
  constexpr int64_t kBlockBytes = kInt4<F> ? 16 : 32;
  constexpr int NH = R * MT >= 8 ? 1 : 2;  // chains per (r, i): the block's halves apart when few
  __m512 acc[R][MT][NH], table[R];
  for (int r = 0; r < R; ++r) {
    table[r] = _mm512_setzero_ps();
    for (auto& v : acc[r])
      for (auto& c : v) c = _mm512_setzero_ps();
  }
  const float* x = p.x + m0 * p.rs;
  const int gshift = rows[0].gshift;
  int64_t tg = -1;  // the group whose int4 tables are built
  for (int64_t b = b0; b < b1; ++b) {
    if ((b * kBlockBytes) % 64 == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r].q + ahead + b * kBlockBytes), _MM_HINT_T0);
    if constexpr (kInt4<F>) {
      if ((b >> gshift) != tg)
        for (int r = 0; r < R; ++r) table[r] = int4_table<F>(rows[r], tg = b >> gshift);
    }
    __m512 w[R][2];
    for (int r = 0; r < R; ++r) dequant_block<F>(rows[r], b, table[r], w[r][0], w[r][1]);
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < MT; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * p.rs + b * p.bs + 16 * h);
        for (int r = 0; r < R; ++r) acc[r][i][h % NH] = _mm512_fmadd_ps(w[r][h], xv, acc[r][i][h % NH]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i)
      out[r * MT + i] = reduce_to_double(NH == 1 ? acc[r][i][0] : _mm512_add_ps(acc[r][i][0], acc[r][i][NH - 1]));
}

// Float mode, the weight rows [0, jn) of a tile against all m rows of x over the blocks [b0, b1):
// part[j * m + i] += their dot products.
template <QFormat F>
void float_tile(const FloatActs& p, const WRow* rows, int64_t jn, int64_t row_bytes, int64_t m, int64_t b0, int64_t b1,
                double* part) {
  // (one row of x: int8 weights stream one weight row at a time, see kM1Rows)
  auto rows_for = [](auto mt) { return std::integral_constant<int, mt == 1 ? kM1Rows<F> : kFloatTileRows>{}; };
  for_register_tiles<kFloatXRows>(jn, m, part, rows_for, [&](auto r, auto mt, int64_t m0, int64_t jj, double* out) {
    rows_float<F, r, mt>(p, rows + jj, m0, b0, b1, kAheadFloat * r * row_bytes, out);
  });
}

// sum_g (m_g + 8 d_g) * sx_g (int4_asym, int8 mode; see qmatmul.cpp).
inline float min_term(const WRow& r, const float* sx, int64_t ng) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= ng; g += 16)
    acc = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0f), _mm512_loadu_ps(r.d + g), _mm512_loadu_ps(r.m + g)),
                          _mm512_loadu_ps(sx + g), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; g < ng; ++g) s += (r.m[g] + 8.0f * r.d[g]) * sx[g];
  return s;
}

// The row tiles of a call are cut into one contiguous range per thread, walked in order by its owner
// (one sequential stream per thread, which the prefetchers follow: SmolLM2's 3072 x 576 at m = 1
// from DRAM on a 2-core Zen 4, 105 -> 62 us with dynamic scheduling of single tiles before); a thread
// done with its range takes tiles from the others' (a thread preempted on a shared machine then
// delays only the tile it holds, as with dynamic scheduling).
struct alignas(64) TileQueue {
  std::atomic<int64_t> next;
  int64_t end;
};

// Steps (units in int8 mode, blocks in float mode) per K chunk: the chunk of all rows of x fits
// kChunkBytes (int8 mode: about 2 bytes per element with nc and dxe; float: 4), at least 4 units.
template <QFormat F, bool Int8Act>
int64_t chunk_steps(const QMatmulArgs& a) {
  const int64_t elems = kChunkBytes / (std::max<int64_t>(a.m, 1) * (Int8Act ? 2 : 4));
  const int64_t per_step = Int8Act ? kUnit<F> * kBlock : kBlock;
  return std::max<int64_t>(4, elems / per_step);
}

template <QFormat F, bool Int8Act>
void run(const QMatmulArgs& a) {
  const int64_t k = a.k, nb = k / kBlock, ng = k / a.group;
  if constexpr (Int8Act)
    if (a.m >= kGemmInt8MinM) return gemm_int8<F>(a);
  if constexpr (!Int8Act && kInt4<F>)
    if (a.xbf && a.m >= kGemmBf16MinM) return gemm_bf16<F>(a);
  const int64_t steps = Int8Act ? (nb + kUnit<F> - 1) / kUnit<F> : nb, cs = chunk_steps<F, Int8Act>(a);
  Acts p{};
  FloatActs pf{};
  FloatM1Acts p1{};
  Bf16Acts pb{};
  constexpr bool kFloatM1 = !Int8Act && kInt4<F>;  // rows_float_m1 when m = 1 (tile_bf16 at any m: a.xbf)
  const bool whole_k = kFloatM1 && (a.m == 1 || a.xbf);  // those take all of K at once
  if constexpr (Int8Act) p = prepare_acts<F>(a);
  else if (kFloatM1 && a.xbf) pb = prepare_bf16(a);
  else if (kFloatM1 && a.m == 1) p1 = prepare_float_m1(a);
  else pf = prepare_float(a);
  const int64_t ntiles = (a.n + kRowTile - 1) / kRowTile;
  std::unique_ptr<TileQueue[]> queues(new TileQueue[omp_get_max_threads()]);
#pragma omp parallel if (a.n * k >= kParallelMinElems)
  {
    // the tile's scales (and mins) as floats, and its partial sums per (weight row, row of x)
    std::vector<float> fs(tile_scale_floats<F>(kRowTile, ng), 0.0f);
    std::vector<double> part(kRowTile * a.m);
    auto tile = [&](int64_t j0) {
      const int64_t jn = std::min(kRowTile, a.n - j0);
      {  // the next tile's scales and mins (the next tile of the range, see TileQueue)
        const int64_t nx = std::min(kRowTile, a.n - j0 - kRowTile);
        for (int64_t o = 0; o < nx * ng * 2; o += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(static_cast<const uint16_t*>(a.scales) + (j0 + kRowTile) * ng) + o, _MM_HINT_T0);
          if (F == QFormat::I4Asym) _mm_prefetch(reinterpret_cast<const char*>(a.mins + (j0 + kRowTile) * ng) + o, _MM_HINT_T0);
        }
      }
      WRow rows[kRowTile];
      tile_rows<F>(a, j0, jn, kRowTile, fs.data(), rows);
      std::fill(part.begin(), part.begin() + jn * a.m, 0.0);
      if constexpr (kFloatM1) {
        if (a.xbf) tile_bf16(pb, rows, jn, nb, a.m, part.data());
        else if (a.m == 1) tile_float_m1<F>(p1, rows, jn, nb, ng, part.data());
      }
      for (int64_t s0 = 0; s0 < (whole_k ? 0 : steps); s0 += cs) {
        const int64_t s1 = std::min(steps, s0 + cs);
        if constexpr (Int8Act) {
          if (a.m == 1) {  // int4_asym: the min term joins in the first chunk
            tile_int8_m1<F>(p, rows, jn, nb, s0, s1, s0 == 0 ? a.sx : nullptr, ng, part.data());
            continue;
          }
        }
        if constexpr (!Int8Act) {
          float_tile<F>(pf, rows, jn, kInt4<F> ? k / 2 : k, a.m, s0, s1, part.data());
          continue;
        }
        for (int64_t jj = 0; jj < jn; ++jj) {
          for (int64_t m0 = 0; m0 < a.m; m0 += kQRows) {
            const int mt = static_cast<int>(std::min<int64_t>(kQRows, a.m - m0));
            double out[kQRows];
            dispatch_rows(mt, [&](auto t) { rows_int8<F, decltype(t)::value>(a, p, rows[jj], m0, s0, s1, out); });
            for (int i = 0; i < mt; ++i) part[jj * a.m + m0 + i] += out[i];
          }
        }
      }
      for (int64_t jj = 0; jj < jn; ++jj) {
        for (int64_t i = 0; i < a.m; ++i) {
          double dv = part[jj * a.m + i];
          if constexpr (F == QFormat::I8Channel) dv *= rows[jj].s32;
          if constexpr (Int8Act && F == QFormat::I4Asym)
            if (a.m > 1) dv += min_term(rows[jj], a.sx + i * ng, ng);  // (m = 1: rows_int8_m1 added it)
          if constexpr (kFloatM1 && F == QFormat::I4Asym)
            if (a.xbf) dv += min_term(rows[jj], pb.sxg.data() + i * ng, ng);
          if (a.bias) dv += load_as_float(a.bias, j0 + jj, a.dt);
          store_from_float(static_cast<char*>(a.y) + i * a.y_stride * dtype_size(a.dt), j0 + jj,
                           static_cast<float>(dv), a.dt);
        }
      }
    };
    const int nt = omp_get_num_threads(), me = omp_get_thread_num();
    queues[me].next = (ntiles * me / nt), queues[me].end = ntiles * (me + 1) / nt;
#pragma omp barrier
    for (int o = 0; o < nt; ++o) {  // its own range, then what the others have left
      TileQueue& q = queues[(me + o) % nt];
      for (int64_t t; (t = q.next.fetch_add(1)) < q.end;) tile(t * kRowTile);
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

}  // namespace fastllm::cpu::avx512
