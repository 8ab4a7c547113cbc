// AVX-512 qmatmul kernels for a single row of x (m = 1, decode), int8 and float mode: several weight
// rows per pass share the activation loads (qmatmul_avx512.h; the driver is qmatmul_avx512.cpp).
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_* (a known
// false positive), once per intrinsic use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "qmatmul_avx512.h"

namespace fastllm::cpu::avx512 {
namespace {

// m = 1: weight rows fetched ahead of the ones being read, in kernel passes (R rows each); int4
// weights interleave R rows, which defeats the hardware prefetcher (4096 x 11008 from DRAM on a 2-core
// Zen 4, 1 thread, 1.30 -> 0.8-0.9 ms). Float mode spends longer per row: 2 passes ahead (SmolLM2's
// 3072 x 576 from DRAM, 61.6 -> 57.0 us), int8 mode 1. Int8 mode fetches into L2 (prefetcht1: SmolLM2's 120
// layer calls 3.8-4.0 -> 3.55-3.65 ms, min of 4), float mode into L1 (into L2 it was 4.4 -> 4.6-4.9 ms).
constexpr int64_t kAheadPassesInt8 = 1, kAheadPassesFloat = 2;

// int4_asym's centred min term: acc[r][1] += sum_g (m_g + 8 d_g) sx_g for the R rows, over ng groups.
template <int R>
inline void add_min_terms(const WRow* rows, const float* sx, int64_t ng, __m512 (&acc)[R][2]) {
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 k = ng - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (ng - g)) - 1);
    const __m512 sv = _mm512_maskz_loadu_ps(k, sx + g);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_maskz_loadu_ps(k, rows[r].d + g), m = _mm512_maskz_loadu_ps(k, rows[r].m + g);
      const __m512 c = _mm512_fmadd_ps(eight, d, m);
      acc[r][1] = _mm512_fmadd_ps(c, sv, acc[r][1]);
    }
  }
}

// unit(t, chain, masked) for every unit of R int4 rows of nb blocks, in order, the two chains alternating: whole
// units in pairs, the R rows' bytes `ahead` of them fetched first (Hint), then the partial last one masked.
template <int R, _mm_hint Hint, typename Unit>
inline void walk_int4_units(const uint8_t* const (&q)[R], int64_t nb, int64_t ahead, Unit&& unit) {
  const int64_t units = (nb + 3) / 4, full = nb / 4;
  int64_t t = 0;
  for (; t + 2 <= full; t += 2) {
    for (int r = 0; r < R; ++r)
      for (int64_t o = 0; o < 2 * kUnitBytes; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q[r] + ahead + t * kUnitBytes + o), Hint);
    unit(t, 0, std::false_type{});
    unit(t + 1, 1, std::false_type{});
  }
  int u = 0;
  for (; t < full; ++t, u ^= 1) unit(t, u, std::false_type{});
  for (; t < units; ++t, u ^= 1) unit(t, u, std::true_type{});
}

// Per-group values v (scales or mins, as floats) of a weight row as a vector over the 16 lanes of unit t (U blocks
// of 16 / U lanes each). Wide (a group spans whole units): the unit's value broadcast; else gathered by a
// permutation, the lanes past the row's end (unit_lanes) zero.
template <int64_t U, bool Wide>
struct UnitGroups {
  int gshift, ushift;  // block b is in group b >> gshift, unit t (Wide) in group t >> ushift
  __m512i sidx;
  explicit UnitGroups(int g)
      : gshift(g), ushift(Wide ? g - (U == 4 ? 2 : 1) : 0),
        sidx(_mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                               (U == 4 ? 2 : 3) + g)) {}
  __m512 operator()(const float* v, int64_t t, __mmask16 lanes) const {
    if constexpr (Wide) return _mm512_set1_ps(v[t >> ushift]);
    else return _mm512_maskz_permutexvar_ps(lanes, sidx, _mm512_loadu_ps(v + ((t * U) >> gshift)));
  }
};

// int8 mode, one row of x (m = 1): out[r] = sum over units [t0, t1) of x . W row rows[r], for r < R.
// The R weight rows share each unit's activation loads; whole units skip load_unit's mask and the
// scale indexing is fixed per call (measured on a 2-core Zen 4, 4096 x 4096 int4: 0.18 -> 0.12 ms
// with both against one row at a time through rows_int8<F, 1>). Per row the lanes add up in two
// chains, even and odd units, so the result does not depend on R. Wide: a group spans whole units
// (one scale per unit, broadcast), else a permutation with its index vector made once (UnitGroups).
// int4_asym: sx non-null adds the min term sum_g (m_g + 8 d_g) sx_g into the lanes.
template <QFormat F, int R, bool Wide>
void rows_int8_m1(const Acts& p, const WRow* rows, int64_t nb, int64_t t0, int64_t t1, const float* sx, int64_t ng,
                  double* out) {
  constexpr int64_t U = kUnit<F>, xbytes = U * kBlock;
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = rows[r].q;
  const UnitGroups<U, Wide> groups(rows[0].gshift);
  __m512 acc[R][2];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = std::min(t1, nb / U);  // units [t0, full) are whole: plain loads
  auto unit = [&](int64_t t, int u, auto masked) {
    auto load = [&](int r) {
      if constexpr (decltype(masked)::value) return load_unit<F>(q[r], t, nb);
      else return _mm512_loadu_si512(q[r] + t * kUnitBytes);
    };
    const __mmask16 lanes = decltype(masked)::value ? unit_lanes<F>(t, nb) : __mmask16(0xFFFF);
    const uint8_t* x = p.xq.data() + t * xbytes;
    const __m512 dxe = _mm512_loadu_ps(p.dxe.data() + t * 16);
    if constexpr (kInt4<F>) {
      const __m512i xl = _mm512_loadu_si512(x), xh = _mm512_loadu_si512(x + 64);
      const __m512i nc = _mm512_loadu_si512(p.nc.data() + t * 16);
      for (int r = 0; r < R; ++r) {
        const __m512i w = load(r);
        const __m512i lo = _mm512_and_si512(w, mask), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(nc, lo, xl), hi, xh);
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), dxe);
        acc[r][u] = _mm512_fmadd_ps(f, groups(rows[r].d, t, lanes), acc[r][u]);
      }
    } else {
      const __m512i xv = _mm512_loadu_si512(x);
      for (int r = 0; r < R; ++r) {
        const __m512i w = load(r);
        const __m512i neg = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w));
        const __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg, xv, w));
        if constexpr (F == QFormat::I8Channel) acc[r][u] = _mm512_fmadd_ps(f, dxe, acc[r][u]);
        else acc[r][u] = _mm512_fmadd_ps(_mm512_mul_ps(f, dxe), groups(rows[r].d, t, lanes), acc[r][u]);
      }
    }
  };
  const std::false_type whole;
  const std::true_type masked;
  int64_t t = t0;
  const int64_t ahead = kAheadPassesInt8 * R * nb * 16;  // int4 (see kAheadPassesInt8)
  for (; t + 2 <= full; t += 2) {
    if constexpr (kInt4<F>)
      for (int r = 0; r < R; ++r)
        for (int64_t o = 0; o < 2 * kUnitBytes; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(q[r] + ahead + t * kUnitBytes + o), _MM_HINT_T1);
    unit(t, 0, whole);
    unit(t + 1, 1, whole);
  }
  int u = 0;  // the chain the next unit goes to
  for (; t < t1; ++t, u ^= 1) unit(t, u, masked);
  if constexpr (F == QFormat::I4Asym)  // the min term joins the lanes (once: sx is null in later chunks)
    if (sx) add_min_terms<R>(rows, sx, ng, acc);
  for (int r = 0; r < R; ++r) out[r] = reduce_to_double(_mm512_add_ps(acc[r][0], acc[r][1]));
}


// Float mode, int4, one row of x (m = 1): out[r] = x . W row rows[r] over all of K, for r < R. Unit t
// (64 bytes, blocks 4t .. 4t + 3) is read as 16 dwords; dword l holds bytes 4l .. 4l + 3 of the unit:
// block l / 4, bytes 4 (l % 4) .. + 3. Its nibble k (k = 0..7) is element 4 (l % 4) + k / 2 (+ 16 for
// odd k) of that block, so w >> 4k indexes (vpermps reads the low 4 bits) a table of u - 8 (int4) or u
// (int4_asym), and the activations are re-laid once per call to match (prepare_float_m1). The weights
// are formats.py's exact values, (u - 8) d or u d + m rounded once, with d and m as vectors spanning
// the unit's 4 blocks (per lane), then FMAs with x. This is the kernel for weights whose u d + m round in fp32
// (or non-finite scales) and for x outside rows_digits_m1's range; other weights take rows_digits_m1. Factoring
// d out here (the vpermps table of u - 8, one FMA per 16 weights) was only 6-10% faster: the loop waits on the
// shift and vpermps per 16 weights. Nibbles made floats without vpermps (OR-ed into 2^23's bits, then 2^23
// subtracted) were 12% slower.
template <QFormat F, int R, bool Wide>
void rows_float_m1(const FloatM1Acts& p, const WRow* rows, int64_t nb, int64_t ng, double* out) {
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = rows[r].q;
  const UnitGroups<4, Wide> groups(rows[0].gshift);
  const __m512 table = F == QFormat::I4Asym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                            : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[R][2];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  auto unit = [&](int64_t t, int u, auto masked) {
    const __mmask16 lanes = decltype(masked)::value ? unit_lanes<F>(t, nb) : __mmask16(0xFFFF);
    const float* x = p.xk.data() + t * 128;
    __m512 xv[8];
    for (int k = 0; k < 8; ++k) xv[k] = _mm512_loadu_ps(x + 16 * k);
    for (int r = 0; r < R; ++r) {
      const __m512i w = decltype(masked)::value ? load_unit<F>(q[r], t, nb) : _mm512_loadu_si512(q[r] + t * kUnitBytes);
      const __m512 dv = groups(rows[r].d, t, lanes);
      const __m512 mv = F == QFormat::I4Asym ? groups(rows[r].m, t, lanes) : _mm512_setzero_ps();
      __m512 s = acc[r][u];
      for (int k = 0; k < 8; ++k) {  // w exactly as formats.py: (u - 8) d, or u d + m rounded once
        const __m512 v = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * k), table);
        const __m512 wk = F == QFormat::I4Asym ? _mm512_fmadd_ps(v, dv, mv) : _mm512_mul_ps(v, dv);
        s = _mm512_fmadd_ps(wk, xv[k], s);
      }
      acc[r][u] = s;
    }
  };
  walk_int4_units<R, _MM_HINT_T0>(q, nb, kAheadPassesFloat * R * nb * 16, unit);
  for (int r = 0; r < R; ++r) out[r] = reduce_to_double(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// Float mode, int4, one row of x (m = 1), for weights that are exact in fp32 (QMatmulArgs::exact) and x that
// prepare_digits takes: out[r] = x . W row rows[r] over all of K, for r < R, with integer dot products. Each x is
// written as five int8 digits, x = 2^E_b (q1 + q2 2^-7 + q3 2^-14 + q4 2^-21 + q5 2^-28) + e with |q| <= 64, E_b per
// block of 32 (its largest |x| is in [32, 64) 2^E_b) and |e| <= 2^-29 2^E_b < 2^-34 max_b |x|. That error is relative
// to the block's largest |x|, not to each element's own, so prepare_digits refuses a block whose largest |x| exceeds
// 2^10 times the mean |x| of its other nonzero elements (a lone outlier, whose weight may be zero): the digits' error
// is then within 2^-24 of that mean per element, one fp32 rounding of a typical product, below the fp32 sums' own.
// Per unit and digit k, vpdpbusd gives each lane S_k = sum (u - 8) q_k over its 8 elements exactly (|S_k| <= 2^12;
// the centring starts the lanes at nc = -8 sum q_k); A = 2^7 S_1 + S_2 and B = 2^14 S_3 + 2^7 S_4 + S_5 stay exact in
// int32, and the lane's block sum A + 2^-21 B is rounded once (B's conversion rounds far below A's last bit), times
// d 2^(E_b - 7). The weight's exact value (u - 8) d (+ m + 8 d) is what formats.py's dequantisation gives, so this is
// the reference's dot product up to the rounding of the sums and the digits' error; int4_asym adds
// sum_g (m_g + 8 d_g) sum(x_g) apart. Against rows_float_m1's vpermps, shift and two FMAs per 16 weights this is 10
// vpdpbusd and 11 other vector operations per 128 weights (on Zen 4 vpdpbusd and FMA share one 512-bit pipe, shifts
// and conversions run beside them). Measured on a 2-core Zen 4 with four digits, one thread, weights in L1/L2: 14-20
// cycles per 128 weights of a row against 22-28; SmolLM2-135M Q4_1's decode step (120 calls, weights from DRAM)
// 7-9% faster, with the weights prefetched into L2 one pass ahead as in int8 mode (two passes: no gain).
template <QFormat F, int R, bool Wide>
void rows_digits_m1(const FloatM1Acts& p, const WRow* rows, int64_t nb, int64_t ng, double* out) {
  static_assert(kDigits == 5, "the digits are combined as A = 2^7 S_1 + S_2, B = 2^14 S_3 + 2^7 S_4 + S_5");
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = rows[r].q;
  const UnitGroups<4, Wide> groups(rows[0].gshift);
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512 low = _mm512_set1_ps(0x1p-21f);
  __m512 acc[R][2];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  auto unit = [&](int64_t t, int u, auto masked) {
    const __mmask16 lanes = decltype(masked)::value ? unit_lanes<F>(t, nb) : __mmask16(0xFFFF);
    const uint8_t* xd = p.digits.data() + t * kDigits * 128;
    const int32_t* nc = p.nc.data() + t * kDigits * 16;
    const __m512 xs = _mm512_loadu_ps(p.xs.data() + t * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i w = decltype(masked)::value ? load_unit<F>(q[r], t, nb) : _mm512_loadu_si512(q[r] + t * kUnitBytes);
      const __m512i lo = _mm512_and_si512(w, mask), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
      __m512i s[kDigits];
      for (int k = 0; k < kDigits; ++k) {
        const uint8_t* plane = xd + 128 * k;  // the digit's low-nibble then high-nibble elements
        s[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_loadu_si512(nc + 16 * k), lo, _mm512_loadu_si512(plane)),
                                   hi, _mm512_loadu_si512(plane + 64));
      }
      const __m512i a = _mm512_add_epi32(_mm512_slli_epi32(s[0], 7), s[1]);  // |a| < 2^20, |b| < 2^27
      const __m512i b = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(s[2], 14), _mm512_slli_epi32(s[3], 7)),
                                         s[4]);
      const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), low, _mm512_cvtepi32_ps(a));
      acc[r][u] = _mm512_fmadd_ps(f, _mm512_mul_ps(groups(rows[r].d, t, lanes), xs), acc[r][u]);
    }
  };
  walk_int4_units<R, _MM_HINT_T1>(q, nb, kAheadPassesInt8 * R * nb * 16, unit);
  if constexpr (F == QFormat::I4Asym) add_min_terms<R>(rows, p.sxg.data(), ng, acc);
  for (int r = 0; r < R; ++r) out[r] = reduce_to_double(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// f(std::integral_constant<int, R>) for the tile's rows R = kM1Rows at a time, then the rest one by
// one; f writes R sums to its out argument, added to part.
template <QFormat F, typename Fn>
void for_row_groups(int64_t jn, double* part, Fn&& f) {
  constexpr int R = kM1Rows<F>;
  double out[R];
  int64_t jj = 0;
  for (; jj + R <= jn; jj += R) {
    f(std::integral_constant<int, R>{}, jj, out);
    for (int r = 0; r < R; ++r) part[jj + r] += out[r];
  }
  for (; jj < jn; ++jj) {
    f(std::integral_constant<int, 1>{}, jj, out);
    part[jj] += out[0];
  }
}

}  // namespace

namespace {

// rows_digits_m1's activations (FloatM1Acts), when every x is 0 or 2^-60 <= |x| < 2^60 and in every block of 32 the
// largest |x| times the count of the other nonzero elements is at most 2^10 times their sum of |x| (else digits_ok
// stays false and the dequantising kernel runs). Then every scaled x below is a normal float and each step exact.
// Per block b (unit t = b / 4, lanes 4 (b % 4) .. + 3), with max |x| = f 2^(ex - 127), f in [1, 2): E = ex - 132,
// so |x| 2^-E < 64; v = x 2^-E, then per digit q = round(v) (to nearest even, |q| <= 64) and v = 128 (v - q). The
// planes follow the weights' unit layout (element i < 16 of block j at byte 16 j + i of the low plane, element
// 16 + i of the high one), as int8 mode's. SmolLM2-135M's decode inputs: the largest such ratio per call had a
// median of 7-25 and reached 1.1e4 in a few down projections (those run the dequantising kernel).
void prepare_digits(const float* x, int64_t nb, int64_t group, FloatM1Acts& p) {
  const int64_t units = (nb + 3) / 4, ng = nb * kBlock / group, bpg = group / kBlock;
  const __m512 zero = _mm512_setzero_ps(), lo = _mm512_set1_ps(0x1p-60f), hi = _mm512_set1_ps(0x1p60f);
  for (int64_t b = 0; b < nb; ++b) {  // the range of every x and the spread of each block (see above)
    const __m512 a0 = _mm512_abs_ps(_mm512_loadu_ps(x + b * kBlock));
    const __m512 a1 = _mm512_abs_ps(_mm512_loadu_ps(x + b * kBlock + 16));
    auto in_range = [&](__m512 v) {  // NaN compares false: out of range
      return _mm512_cmp_ps_mask(v, zero, _CMP_EQ_OQ) |
             (_mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, hi, _CMP_LT_OQ));
    };
    if ((in_range(a0) & in_range(a1)) != 0xFFFF) return;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    const double rest = double(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1))) - amax;  // sum of the others' |x|
    const int nonzero = __builtin_popcount(_mm512_cmp_ps_mask(a0, zero, _CMP_NEQ_UQ)) +
                        __builtin_popcount(_mm512_cmp_ps_mask(a1, zero, _CMP_NEQ_UQ));
    if (amax > 0.0f && double(amax) * (nonzero - 1) > 1024.0 * rest) return;
  }
  p.digits.assign(units * kDigits * 128, 0);
  p.nc.assign(units * kDigits * 16, 0);
  p.xs.assign(units * 16, 0.0f);
  std::vector<double> sums(ng, 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t = b / 4, j = b % 4;
    const __m512 x0 = _mm512_loadu_ps(x + b * kBlock), x1 = _mm512_loadu_ps(x + b * kBlock + 16);
    sums[b / bpg] += _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    if (amax == 0.0f) continue;  // digits 0
    uint32_t bits;
    std::memcpy(&bits, &amax, 4);
    const uint32_t ex = bits >> 23, pow_bits = (259 - ex) << 23, xs_bits = (ex - 12) << 23;
    float pow2, xs;
    std::memcpy(&pow2, &pow_bits, 4);
    std::memcpy(&xs, &xs_bits, 4);
    std::fill(p.xs.begin() + t * 16 + 4 * j, p.xs.begin() + t * 16 + 4 * j + 4, xs);
    for (int h = 0; h < 2; ++h) {
      __m512 v = _mm512_mul_ps(h ? x1 : x0, _mm512_set1_ps(pow2));
      for (int k = 0; k < kDigits; ++k) {
        const __m512 q = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p.digits.data() + (t * kDigits + k) * 128 + 64 * h + 16 * j),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
        v = _mm512_mul_ps(_mm512_sub_ps(v, q), _mm512_set1_ps(128.0f));
      }
    }
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < units * kDigits; ++i) {  // nc = -8 * (the lane's 8 digits summed)
    const uint8_t* plane = p.digits.data() + i * 128;
    const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(plane)),
                                          ones, _mm512_loadu_si512(plane + 64));
    _mm512_storeu_si512(p.nc.data() + i * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, 3)));
  }
  p.sxg.assign(sums.begin(), sums.end());
  p.digits_ok = true;
}

}  // namespace

FloatM1Acts prepare_float_m1(const QMatmulArgs& a) {
  const int64_t nb = a.k / kBlock, units = (nb + 3) / 4;
  FloatM1Acts p{{}, false, {}, {}, {}, {}};
  const float* x = a.xf;
  if (a.exact) prepare_digits(x, nb, a.group, p);
  if (p.digits_ok) return p;
  p.xk.assign(units * 128, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t = b / 4, lb = (b % 4) * 4;  // lanes lb .. lb + 3 hold this block
    float* dst = p.xk.data() + t * 128;
    for (int64_t i = 0; i < 16; ++i)  // byte i of the block: lane lb + i / 4, nibbles k = 2 (i % 4) (+ 1)
      for (int h = 0; h < 2; ++h) dst[(2 * (i % 4) + h) * 16 + lb + i / 4] = x[b * kBlock + i + 16 * h];
  }
  return p;
}

template <QFormat F>
void tile_int8_m1(const Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t t0, int64_t t1, const float* sx,
                  int64_t ng, double* part) {
  const bool wide = (int64_t(1) << rows[0].gshift) >= kUnit<F>;
  for_row_groups<F>(jn, part, [&](auto r, int64_t jj, double* out) {
    if (wide) rows_int8_m1<F, decltype(r)::value, true>(p, rows + jj, nb, t0, t1, sx, ng, out);
    else rows_int8_m1<F, decltype(r)::value, false>(p, rows + jj, nb, t0, t1, sx, ng, out);
  });
}

template <QFormat F>
void tile_float_m1(const FloatM1Acts& p, const WRow* rows, int64_t jn, int64_t nb, int64_t ng, double* part) {
  if constexpr (kInt4<F>) {
    const bool wide = (int64_t(1) << rows[0].gshift) >= 4;
    for_row_groups<F>(jn, part, [&](auto r, int64_t jj, double* out) {
      constexpr int R = decltype(r)::value;
      if (p.digits_ok) {
        if (wide) rows_digits_m1<F, R, true>(p, rows + jj, nb, ng, out);
        else rows_digits_m1<F, R, false>(p, rows + jj, nb, ng, out);
      } else if (wide) {
        rows_float_m1<F, R, true>(p, rows + jj, nb, ng, out);
      } else {
        rows_float_m1<F, R, false>(p, rows + jj, nb, ng, out);
      }
    });
  }
}

template void tile_int8_m1<QFormat::I8Channel>(const Acts&, const WRow*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, double*);
template void tile_int8_m1<QFormat::I8Group>(const Acts&, const WRow*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, double*);
template void tile_int8_m1<QFormat::I4>(const Acts&, const WRow*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, double*);
template void tile_int8_m1<QFormat::I4Asym>(const Acts&, const WRow*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, double*);
template void tile_float_m1<QFormat::I4>(const FloatM1Acts&, const WRow*, int64_t, int64_t, int64_t, double*);
template void tile_float_m1<QFormat::I4Asym>(const FloatM1Acts&, const WRow*, int64_t, int64_t, int64_t, double*);

}  // namespace fastllm::cpu::avx512
