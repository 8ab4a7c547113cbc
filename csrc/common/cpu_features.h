// Run-time CPU feature detection (CPUID through the compiler's builtins).
#pragma once

namespace fastllm {

// True when the CPU and OS support AVX2 and FMA.
bool cpu_has_avx2_fma();

// True when the *_avx2.cpp paths should run: the CPU supports them and they were not
// switched off (FASTLLM_DISABLE_AVX2=1 at load time, or set_cpu_simd_enabled(false),
// which the tests use to check the scalar paths on an AVX2 machine).
bool cpu_use_avx2();
void set_cpu_simd_enabled(bool enabled);

}  // namespace fastllm
