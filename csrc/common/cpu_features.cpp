#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastllm {

static bool env_disabled() {
  const char* off = std::getenv("FASTLLM_DISABLE_AVX2");
  return off && off[0] != '\0' && std::strcmp(off, "0") != 0;
}

static std::atomic<bool> g_simd_enabled{!env_disabled()};

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_use_avx2() { return g_simd_enabled.load(std::memory_order_relaxed) && cpu_has_avx2_fma(); }

void set_cpu_simd_enabled(bool enabled) { g_simd_enabled.store(enabled, std::memory_order_relaxed); }

}  // namespace fastllm
