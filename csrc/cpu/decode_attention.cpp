// Decode attention over a KV cache on the CPU: the ops.h entry point, which runs the AVX2 path
// (decode_attention_avx2.cpp) when cpu_use_avx2() and otherwise the portable inner loops below; both drive
// the same loop over (sequence, query, head) items (decode_attention.h), fp32 accumulation.
#include "decode_attention.h"

#include <cmath>

#include "../common/cpu_features.h"

namespace fastllm::cpu {
namespace {

struct ScalarOps {
  template <DType D>
  static float dot(const float* q, const storage_t<D>* k, int64_t n) {
    return lane_sum(n, [&](int64_t j) { return q[j] * to_float<D>(k[j]); });
  }
  static float dot_i8(const float* q, const int8_t* k, int64_t n) {
    return lane_sum(n, [&](int64_t j) { return q[j] * static_cast<float>(k[j]); });
  }
  template <DType D>
  static void axpy(float* acc, float p, const storage_t<D>* v, int64_t n) {
    for (int64_t j = 0; j < n; ++j) acc[j] += p * to_float<D>(v[j]);
  }
  static void axpy_i8(float* acc, float p, const int8_t* v, int64_t n) {
    for (int64_t j = 0; j < n; ++j) acc[j] += p * static_cast<float>(v[j]);
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
