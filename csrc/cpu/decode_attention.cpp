// Decode attention over a KV cache on the CPU: the ops.h entry point, which runs the AVX2 path
// (decode_attention_avx2.cpp) when cpu_use_avx2() and otherwise the portable inner loops below; both drive
// the same loop over (sequence, key range) items (decode_attention.h), fp32 accumulation.
#include "decode_attention.h"

#include <cmath>

#include "../common/cpu_features.h"

namespace fastllm::cpu {
namespace {

struct ScalarOps {
  template <DType D, bool I8>
  static float value(const cache_t<D, I8>* row, int64_t j) {
    if constexpr (I8) return static_cast<float>(row[j]);
    else return to_float<D>(row[j]);
  }
  template <DType D, bool I8>
  static void dots(const float* q, const cache_t<D, I8>* const* rows, int64_t n, float* out) {
    for (int t = 0; t < kKeyBlock; ++t)
      out[t] = lane_sum(n, [&](int64_t j) { return q[j] * value<D, I8>(rows[t], j); });
  }
  template <DType D, bool I8>
  static void axpys(float* acc, const float* p, const cache_t<D, I8>* const* rows, int nr, int64_t n) {
    for (int t = 0; t < nr; ++t)
      for (int64_t j = 0; j < n; ++j) acc[j] += p[t] * value<D, I8>(rows[t], j);
  }
  static float exp_sum(float* s, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    return sum;
  }
};

}  // namespace

void decode_attention(const DecodeAttnArgs& a) {
  if (a.batch == 0 || a.lq == 0 || a.hq == 0) return;
  if (cpu_use_avx2()) return avx2::decode_attention(a);
  decode_attention_run<ScalarOps>(a);
}

}  // namespace fastllm::cpu
