#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fastllm {

static bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

static int env_cap() {
  if (env_set("FASTLLM_DISABLE_AVX2")) return kSimdScalar;
  if (env_set("FASTLLM_DISABLE_AVX512")) return kSimdAvx2;
  if (env_set("FASTLLM_DISABLE_AVX512_BF16")) return kSimdAvx512;
  return kSimdAvx512Bf16;
}

static std::atomic<int> g_simd_max{env_cap()};

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

#if defined(__x86_64__) || defined(__i386__)
// XCR0 (XGETBV with ecx = 0); call only when CPUID reports OSXSAVE.
static uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

static bool os_saves_zmm() {
  uint32_t a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  if (!(c & (1u << 27))) return false;  // OSXSAVE: XGETBV usable
  // XCR0 bits 1-2 (xmm, ymm) and 5-7 (opmask, upper zmm 0-15, zmm 16-31) must all be on.
  constexpr uint64_t kNeeded = (1u << 1) | (1u << 2) | (1u << 5) | (1u << 6) | (1u << 7);
  return (xcr0() & kNeeded) == kNeeded;
}
#endif

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && os_saves_zmm();
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

int cpu_simd_level() {
  const int cap = g_simd_max.load(std::memory_order_relaxed);
  if (cap >= kSimdAvx512Bf16 && cpu_has_avx512_bf16()) return kSimdAvx512Bf16;
  if (cap >= kSimdAvx512 && cpu_has_avx512_vnni()) return kSimdAvx512;
  if (cap >= kSimdAvx2 && cpu_has_avx2_fma()) return kSimdAvx2;
  return kSimdScalar;
}

void set_cpu_simd_max(int level) { g_simd_max.store(level, std::memory_order_relaxed); }

void set_cpu_simd_enabled(bool enabled) { set_cpu_simd_max(enabled ? kSimdAvx512Bf16 : kSimdScalar); }

double measure_zmm_fma_gain();  // fma_probe_avx512.cpp: AVX-512 instructions, so only where cpu_has_avx512_vnni()

double cpu_zmm_fma_gain() {
  static const double gain = cpu_has_avx512_vnni() ? measure_zmm_fma_gain() : 0.0;
  return gain;
}

static int env_zmm_float_gemm() {
  const char* v = std::getenv("FASTLLM_ZMM_FLOAT_GEMM");
  if (!v || v[0] == '\0') return -1;
  return std::strcmp(v, "0") != 0;
}

static std::atomic<int> g_zmm_float_gemm{env_zmm_float_gemm()};

bool cpu_zmm_float_gemm() {
  const int mode = g_zmm_float_gemm.load(std::memory_order_relaxed);
  return mode >= 0 ? mode != 0 : cpu_zmm_fma_gain() >= 1.5;
}

int set_cpu_zmm_float_gemm(int mode) {
  return g_zmm_float_gemm.exchange(mode < 0 ? -1 : mode != 0, std::memory_order_relaxed);
}

}  // namespace fastllm
