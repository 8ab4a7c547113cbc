// Weight-only quantised matmul on the CPU (ops.h): y = x @ W^T + bias with W packed (QFormat).
// This file prepares the activations once per call (shared by both paths, so the int8 mode
// quantises bit-identically to the reference) and holds the portable scalar path; the SIMD paths
// are qmatmul_avx2.cpp and qmatmul_avx512.cpp (chosen at run time). All parallelise over output
// channels (OpenMP) and read each weight row once for all rows of x.
//   float mode: y = sum_k x[k] * W[k], W dequantised exactly in fp32 (q * d, (u - 8) * d, u * d + m).
//   int8 mode:  per block b of 32: s_b = sum_i wq_i * qx_i (integer; wq = q, or u - 8 for both
//               int4 formats), then y = sum_b s_b * dx_b * d_g(b), plus for I4Asym
//               sum_g (m_g + 8 d_g) * sx_g with sx_g = sum over the group's blocks of dx_b * sum_i qx_i
//               (centred: u d + m = (u - 8) d + (m + 8 d), no cancellation against the min term).
//   bfloat16 x, int4 weights, float mode, AVX512_BF16 CPUs: y = sum_b d_b sum_{i in b} (u_i - 8) x_i plus the
//               same centred min term, products exact in vdpbf16ps (qmatmul_rows_avx512bf16.cpp for up to
//               11 rows of x, qmatmul_gemm_avx512bf16.cpp above); x outside their range (bf16_dot_range)
//               runs float mode.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_features.h"
#include "kernels.h"
#include "ops.h"

namespace fastllm::cpu {
namespace {

constexpr int64_t kBlock = 32;
// Float activations run the AVX-512 path for fewer rows of x than this: its M = 1 schedule streams
// the weights from DRAM at 2x the AVX2 path's rate (SmolLM2's int8 head, 49152 x 576, 2.27 -> 0.97 ms
// on a 2-core Zen 4), and its register tiles of 4 weight rows x up to 4 rows of x beat the AVX2 FMA
// loop at M = 2-7 (SmolLM2's 576 x 3072 and 1536 x 576, every format: 1.0-1.6x) but not at M = 8,
// where the AVX2 loop takes all 8 rows in one pass (0.85-1.0x: 4 + 4 dequantises each block twice).
// Where 16-lane FMAs pay (cpu_zmm_float_gemm()) the register tiles run up to avx2::kGemmMinM - 1 rows: on a
// 2-core Intel Xeon at M = 8-10 they took 0.6-0.75x the AVX2 loop's time (SmolLM2's shapes and 4096 x 4096).
// From avx2::kGemmMinM rows on the GEMM runs on 16-lane FMAs where cpu_zmm_float_gemm(), else the AVX2 one,
// also on AVX-512 CPUs: the 16-lane one (32-row panels, 24 zmm accumulators) measured the same on one Zen 4
// core at multiples of 32 rows (88-98 GFLOP/s at M = 128; Zen 4 runs two 256-bit FMAs or one 512-bit a cycle)
// and 1.1-1.5x slower elsewhere (its padding).
constexpr int64_t kAvx512FloatMaxM = 8;

// Block scale of x and its int8 values (see ops.h): bit-identical to the reference because it is
// the same IEEE operations (max, one division, one multiplication, round half to even). A block
// holding NaN or inf gets q = 0 and d = NaN, so the outputs it reaches are NaN.
void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < kBlock; ++i) {
    finite &= std::fabs(x[i]) <= std::numeric_limits<float>::max();
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    std::fill(q, q + kBlock, int8_t(0));
    *d = std::numeric_limits<float>::quiet_NaN();
    *sum = 0;
    return;
  }
  const float inv = amax == 0.0f ? 0.0f : 127.0f / amax;
  int32_t s = 0;
  for (int i = 0; i < kBlock; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
    s += q[i];
  }
  *d = amax / 127.0f;
  *sum = s;
}

// Whether every element of the bfloat16 x (m x k, row stride xs) is zero or has 2^-119 <= |x| < 2^64: the range
// where the AVX512_BF16 kernels give what the fp32 path gives up to rounding. vdpbf16ps flushes subnormal inputs
// and results to zero; from 2^-119 on every product and partial sum is a multiple of 2^-126, so none is
// subnormal. Below 2^64 no block sum, scaled block sum (fp16 scales and mins) or total can overflow unless the
// result itself would. Other x (inf, NaN, tiny, huge) runs float mode, which dequantises the weights first, as
// the reference does.
bool bf16_dot_range(const uint16_t* x, int64_t xs, int64_t m, int64_t k) {
  bool ok = true;
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* row = x + i * xs;
    for (int64_t j = 0; j < k; ++j) {
      const uint16_t v = row[j] & 0x7FFF;  // exponent field 8 .. 127 + 63 (0x0400 .. 0x5F7F), or 0 itself
      ok &= v == 0 || (v >= 0x0400 && v < 0x5F80);
    }
  }
  return ok;
}

struct Prepared {
  std::vector<float> xf;  // float mode: x as fp32 when x is not fp32 already
  std::vector<int8_t> qx;
  std::vector<float> dx, sx;
};

// Fills a.xf/a.xf_stride (float mode) or a.qx/a.dx/a.sx (int8 mode) from x.
void prepare(const void* x, int64_t x_stride, QMatmulArgs& a, Prepared& p) {
  const int64_t k = a.k, nb = k / kBlock;
  if (a.dt == DType::F32) {
    a.xf = static_cast<const float*>(x);
    a.xf_stride = x_stride;
  } else {
    p.xf.resize(a.m * k);
    dispatch_dtype(a.dt, [&](auto d) {
      constexpr DType D = decltype(d)::value;
#pragma omp parallel for schedule(static) if (a.m > 1 && a.m * k >= kParallelMinElems)
      for (int64_t i = 0; i < a.m; ++i) {
        const auto* src = row_ptr<D>(x, x_stride, i);
        for (int64_t j = 0; j < k; ++j) p.xf[i * k + j] = to_float<D>(src[j]);
      }
    });
    a.xf = p.xf.data();
    a.xf_stride = k;
  }
  if (!a.int8_act) return;
  p.qx.resize(a.m * k);
  p.dx.resize(a.m * nb);
  const int64_t ng = k / a.group;
  if (a.fmt == QFormat::I4Asym) p.sx.assign(a.m * ng, 0.0f);
  const auto quantize = cpu_use_avx512() ? avx512::quantize_block : quantize_block;
#pragma omp parallel for schedule(static) if (a.m > 1 && a.m * k >= kParallelMinElems)
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s;
      quantize(a.xf + i * a.xf_stride + b * kBlock, p.qx.data() + i * k + b * kBlock, &p.dx[i * nb + b], &s);
      if (a.fmt == QFormat::I4Asym) p.sx[i * ng + b * kBlock / a.group] += p.dx[i * nb + b] * static_cast<float>(s);
    }
  }
  a.qx = p.qx.data();
  a.dx = p.dx.data();
  a.sx = a.fmt == QFormat::I4Asym ? p.sx.data() : nullptr;
}

// ---- scalar path ----------------------------------------------------------------------------

template <QFormat F>
inline int32_t wint(const void* w, int64_t k_total, int64_t j, int64_t k) {
  if constexpr (F == QFormat::I8Channel || F == QFormat::I8Group) {
    return static_cast<const int8_t*>(w)[j * k_total + k];
  } else {
    const uint8_t byte = static_cast<const uint8_t*>(w)[j * (k_total / 2) + (k / kBlock) * 16 + (k % 16)];
    return ((k % kBlock) < 16 ? (byte & 0x0F) : (byte >> 4)) - (F == QFormat::I4 ? 8 : 0);
  }
}

template <QFormat F>
inline float wscale(const QMatmulArgs& a, int64_t j, int64_t g) {
  if constexpr (F == QFormat::I8Channel) return static_cast<const float*>(a.scales)[j];
  else return half_to_float(static_cast<const uint16_t*>(a.scales)[j * (a.k / a.group) + g]);
}

template <QFormat F>
void scalar_float(const QMatmulArgs& a) {
  const int64_t k = a.k;
#pragma omp parallel if (a.n * k >= kParallelMinElems)
  {
    std::vector<float> wrow(k);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < a.n; ++j) {
      for (int64_t c = 0; c < k; ++c) {  // the exact fp32 dequantisation of formats.py
        const int64_t g = c / a.group;
        float v = static_cast<float>(wint<F>(a.w, k, j, c)) * wscale<F>(a, j, g);
        if constexpr (F == QFormat::I4Asym) v += half_to_float(a.mins[j * (k / a.group) + g]);
        wrow[c] = v;
      }
      for (int64_t i = 0; i < a.m; ++i) {
        const float* x = a.xf + i * a.xf_stride;
        const float out = lane_sum(k, [&](int64_t c) { return x[c] * wrow[c]; });
        store_outputs(a, i, 1, j, &out);
      }
    }
  }
}

template <QFormat F>
void scalar_int8(const QMatmulArgs& a) {
  const int64_t k = a.k, nb = k / kBlock, ng = k / a.group;
  constexpr int32_t kCentre = F == QFormat::I4Asym ? 8 : 0;  // I4Asym: sum (u - 8) qx, see the top
#pragma omp parallel for schedule(static) if (a.n * k >= kParallelMinElems)
  for (int64_t j = 0; j < a.n; ++j) {
    for (int64_t i = 0; i < a.m; ++i) {
      const int8_t* qx = a.qx + i * k;
      // The scaled block sums (and the min terms) are added in 8 lanes, as the SIMD paths add theirs: one
      // sequential fp32 sum over a long K (257 blocks) had 2.7x torch's error on a CPU whose BLAS sums in
      // lanes.
      float acc = lane_sum(nb, [&](int64_t b) {
        int32_t s = 0;
        for (int64_t c = b * kBlock; c < (b + 1) * kBlock; ++c) s += (wint<F>(a.w, k, j, c) - kCentre) * qx[c];
        float ds = a.dx[i * nb + b];
        if constexpr (F != QFormat::I8Channel) ds *= wscale<F>(a, j, b * kBlock / a.group);
        return static_cast<float>(s) * ds;
      });
      if constexpr (F == QFormat::I8Channel) acc *= wscale<F>(a, j, 0);
      if constexpr (F == QFormat::I4Asym)
        acc += lane_sum(ng, [&](int64_t g) {
          return (half_to_float(a.mins[j * ng + g]) + 8.0f * wscale<F>(a, j, g)) * a.sx[i * ng + g];
        });
      store_outputs(a, i, 1, j, &acc);
    }
  }
}

}  // namespace

void qmatmul(const void* x, int64_t x_stride, const void* w, const void* scales, const uint16_t* mins,
             const void* bias, void* y, int64_t y_stride, int64_t m, int64_t n, int64_t k, int64_t group,
             QFormat fmt, bool int8_act, bool exact, DType dt) {
  if (m == 0) return;
  QMatmulArgs a{nullptr, 0, nullptr, nullptr, nullptr, nullptr, w, scales, mins, bias, y, y_stride,
                m, n, k, group, fmt, int8_act, dt, exact};
  if (dt == DType::BF16 && !int8_act && (fmt == QFormat::I4 || fmt == QFormat::I4Asym) && cpu_use_avx512_bf16() &&
      bf16_dot_range(static_cast<const uint16_t*>(x), x_stride, m, k)) {
    a.xbf = static_cast<const uint16_t*>(x);  // bfloat16 dot products on x as it is
    a.xf_stride = x_stride;
    return avx512::qmatmul(a);
  }
  Prepared p;
  prepare(x, x_stride, a, p);
  if (cpu_use_avx512() && !int8_act && m >= avx2::kGemmMinM && cpu_zmm_float_gemm()) return avx512::gemm_float(a);
  if (cpu_use_avx512() &&
      (int8_act || m < kAvx512FloatMaxM || (m < avx2::kGemmMinM && cpu_zmm_float_gemm())))
    return avx512::qmatmul(a);
  if (cpu_use_avx2()) return avx2::qmatmul(a);
  dispatch_qformat(fmt, [&](auto f) {
    if (int8_act) scalar_int8<decltype(f)::value>(a);
    else scalar_float<decltype(f)::value>(a);
  });
}

}  // namespace fastllm::cpu
