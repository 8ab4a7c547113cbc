// Run-time CPU feature detection (CPUID through the compiler's builtins, XGETBV for the OS state).
#pragma once

namespace fastllm {

// SIMD levels of the CPU kernels, in order: a level's files run only when the CPU and OS support
// it and it is not above the cap (set_cpu_simd_max).
//   0 scalar   portable C++
//   1 avx2     *_avx2.cpp: AVX2, FMA, F16C
//   2 avx512   *_avx512.cpp: AVX-512 F/BW/VL/VNNI (zmm and opmask state enabled by the OS)
//   3 avx512bf16  *_avx512bf16.cpp: level 2 and AVX512_BF16 (vdpbf16ps: bfloat16 dot products)
enum SimdLevel : int { kSimdScalar = 0, kSimdAvx2 = 1, kSimdAvx512 = 2, kSimdAvx512Bf16 = 3 };

// True when the CPU and OS support AVX2 and FMA (and F16C).
bool cpu_has_avx2_fma();
// True when the CPU supports AVX-512 F/BW/VL/VNNI and the OS saves the zmm and opmask registers.
bool cpu_has_avx512_vnni();
// True when, besides that, the CPU supports AVX512_BF16.
bool cpu_has_avx512_bf16();

// The highest level the CPU supports, capped by set_cpu_simd_max (default: no cap; the
// environment variables FASTLLM_DISABLE_AVX2=1 / FASTLLM_DISABLE_AVX512=1 /
// FASTLLM_DISABLE_AVX512_BF16=1 cap it at load time to scalar / avx2 / avx512). The tests use the
// cap to run every path on one machine.
int cpu_simd_level();
void set_cpu_simd_max(int level);
inline bool cpu_use_avx2() { return cpu_simd_level() >= kSimdAvx2; }
inline bool cpu_use_avx512() { return cpu_simd_level() >= kSimdAvx512; }
inline bool cpu_use_avx512_bf16() { return cpu_simd_level() >= kSimdAvx512Bf16; }
// set_cpu_simd_max(enabled ? the highest level : scalar), kept for the tests that switch SIMD off.
void set_cpu_simd_enabled(bool enabled);

// How many more float lanes a second this core's 16-lane FMAs give than its 8-lane ones, measured once (about
// 0.5 ms, fma_probe_avx512.cpp) on AVX-512 CPUs (0 elsewhere): about 2 where a core issues two 512-bit FMAs a cycle
// (Intel Xeon), about 1 where it splits them into 256-bit halves (Zen 4) or has one 512-bit port.
double cpu_zmm_fma_gain();
// Whether the float qmatmul GEMM (prefill) runs on 16-lane FMAs at the AVX-512 level: by default where
// cpu_zmm_fma_gain() >= 1.5 (elsewhere the 8-lane GEMM is as fast, and its smaller panels pad less).
// The choice also moves float mode at M = 8-10 onto the AVX-512 register tiles (a different summation order), so
// FASTLLM_ZMM_FLOAT_GEMM=0 / 1 in the environment fixes it at load time for runs that must not depend on a
// timing. set_cpu_zmm_float_gemm(1 / 0) forces it on / off (the tests run both paths on one machine), -1 restores
// the default; it returns the mode it replaced.
bool cpu_zmm_float_gemm();
int set_cpu_zmm_float_gemm(int mode);

}  // namespace fastllm
