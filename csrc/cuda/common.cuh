// Shared CUDA helpers of fastllm._C (header only, included by the .cu files).
//
// Host side: error checks that throw std::runtime_error (never abort), a kernel launch helper that
// checks cudaGetLastError right after the launch, per-device attributes (SM count, opt-in shared
// memory) and occupancy numbers, each queried once and cached.
// Device side: element traits for float / __half / __nv_bfloat16 (to_float / from_float, and the
// packing of a 128-bit word), 128-bit vector loads and stores of one "slot" of a row, and sum
// reductions over a warp, a group of lanes, or a whole block.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace fastllm::cuda {

// =================================== host side ===================================

[[noreturn]] inline void throw_cuda_error(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("fastllm._C: CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda_error(what, err);
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

struct DeviceInfo {
  int sm_count = 0;
  int max_smem_optin = 0;  // bytes of shared memory one block may opt in to
};

// Attributes of the current device, queried once per device (thread-safe cache).
inline DeviceInfo device_info() {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  check_cuda(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  check_cuda(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  cache.emplace(dev, info);
  return info;
}

// Blocks of `kernel` (launched with `block` threads and `smem` dynamic shared bytes) that fit on one
// SM of the current device, at least 1; cached per (device, kernel, block, smem).
inline int max_blocks_per_sm(const void* kernel, int block, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(current_device(), kernel, block, smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, block, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  n = std::max(n, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = n;
  return n;
}

// Blocks of `kernel` resident on the whole current device at once.
template <typename... P>
int64_t resident_blocks(void (*kernel)(P...), int block, size_t smem) {
  return int64_t(max_blocks_per_sm(reinterpret_cast<const void*>(kernel), block, smem)) * device_info().sm_count;
}

// kernel<<<grid, block, smem, stream>>>(args...), then cudaGetLastError; throws std::runtime_error
// naming the kernel. Never synchronises.
template <typename... P, typename... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(name, err);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// True when every row start of a (rows x *, row stride `stride` elements) view at p is 16-byte
// aligned, so that 128-bit accesses at multiples of 16 bytes from a row start are legal.
// nullptr (an absent optional tensor) counts as aligned.
template <typename T>
bool rows_aligned16(const void* p, int64_t stride, int64_t rows) {
  if (p == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return rows <= 1 || (stride * int64_t(sizeof(T))) % 16 == 0;
}

// =================================== device side ===================================

// Element traits: kVec elements fill one 128-bit word; unpack/pack convert such a word.
template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct ElemTraits<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // the element at the lower address is the low half
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);  // .x (low) = first argument
      w[i] = static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
             (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 is the upper half of an fp32: exact by shifting
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);  // .x (low) = first argument
      w[i] = static_cast<uint32_t>(__bfloat16_as_ushort(__low2bfloat16(h))) |
             (static_cast<uint32_t>(__bfloat16_as_ushort(__high2bfloat16(h))) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) { return ElemTraits<T>::to_float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) { return ElemTraits<T>::from_float(v); }
// v rounded to T's precision (round to nearest even), back as float.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// 128-bit load / store of kVec consecutive elements; p must be 16-byte aligned.
template <typename T, bool READ_ONLY = false>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[ElemTraits<T>::kVec]) {
  const uint4 u = READ_ONLY ? __ldg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
  ElemTraits<T>::unpack(u, f);
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[ElemTraits<T>::kVec]) {
  *reinterpret_cast<uint4*>(p) = ElemTraits<T>::pack(f);
}

// ---- which rows a thread works on ----
// GROUP = 2..32 (power of two): GROUP consecutive lanes share a row, a warp works on 32/GROUP
// consecutive rows per iteration. GROUP = 0: the whole block shares a row. Loop:
//   for (int64_t r0 = g.first; r0 < rows; r0 += g.step) { const int64_t row = r0 + g.sub; ... }
// r0 is uniform over a warp (GROUP > 0) or a block (GROUP = 0), so every thread that must join a
// reduction does; a thread whose row >= rows still joins the reductions (with zeros) and skips the
// memory accesses. Host side: rows per block and iteration = GROUP ? blockDim / GROUP : 1.
template <int GROUP>
struct RowGroup {
  int t;          // this thread's index among the threads sharing its row
  int nt;         // threads sharing a row
  int sub;        // row offset of this thread's group within the warp's rows of one iteration
  int64_t first;  // first r0 of this warp (block)
  int64_t step;   // r0 increment
  __device__ __forceinline__ static RowGroup make() {
    RowGroup g;
    if constexpr (GROUP == 0) {
      g.t = threadIdx.x;
      g.nt = blockDim.x;
      g.sub = 0;
      g.first = blockIdx.x;
      g.step = gridDim.x;
    } else {
      static_assert(GROUP >= 2 && GROUP <= 32 && (GROUP & (GROUP - 1)) == 0, "GROUP: power of two <= 32");
      const int lane = threadIdx.x & 31;
      const int warps_per_block = blockDim.x >> 5;
      g.t = lane % GROUP;
      g.nt = GROUP;
      g.sub = lane / GROUP;
      g.first = (int64_t(blockIdx.x) * warps_per_block + (threadIdx.x >> 5)) * (32 / GROUP);
      g.step = int64_t(gridDim.x) * warps_per_block * (32 / GROUP);
    }
    return g;
  }
};

// ---- row slots ----
// Thread t (of nt threads sharing a row) owns slots j = 0, 1, ... of the row, V = kVec elements each:
//   VEC = true:  slot j is columns (t + j*nt)*V + e, e < V: one 128-bit access (row start aligned);
//   VEC = false: slot j is columns t + (j*V + e)*nt: one coalesced element access per e.
// Either layout covers columns [0, slots*V*nt) exactly once. Columns >= cols read as 0 and are not
// written. All index arithmetic is in int: callers keep cols + nt*V below 2^31.
template <bool VEC, int V>
__device__ __forceinline__ int slot_col(int j, int e, int t, int nt) {
  if constexpr (VEC) return (t + j * nt) * V + e;
  else return t + (j * V + e) * nt;
}

template <typename T, bool VEC, bool READ_ONLY = false>
__device__ __forceinline__ void load_slot(const T* row, int cols, int j, int t, int nt,
                                          float (&f)[ElemTraits<T>::kVec]) {
  constexpr int V = ElemTraits<T>::kVec;
  if constexpr (VEC) {
    const int c0 = (t + j * nt) * V;
    if (c0 + V <= cols) {
      load_vec<T, READ_ONLY>(row + c0, f);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) f[e] = c0 + e < cols ? to_float(row[c0 + e]) : 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = slot_col<false, V>(j, e, t, nt);
      f[e] = c < cols ? to_float(row[c]) : 0.f;
    }
  }
}

// As load_slot, but an absent tensor (row == nullptr) reads as `fill` everywhere (weight 1, bias 0).
template <typename T, bool VEC>
__device__ __forceinline__ void load_slot_or(const T* row, float fill, int cols, int j, int t, int nt,
                                             float (&f)[ElemTraits<T>::kVec]) {
  if (row == nullptr) {
#pragma unroll
    for (int e = 0; e < ElemTraits<T>::kVec; ++e) f[e] = fill;
  } else {
    load_slot<T, VEC, true>(row, cols, j, t, nt, f);
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_slot(T* row, int cols, int j, int t, int nt,
                                           const float (&f)[ElemTraits<T>::kVec]) {
  constexpr int V = ElemTraits<T>::kVec;
  if constexpr (VEC) {
    const int c0 = (t + j * nt) * V;
    if (c0 + V <= cols) {
      store_vec<T>(row + c0, f);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (c0 + e < cols) row[c0 + e] = from_float<T>(f[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = slot_col<false, V>(j, e, t, nt);
      if (c < cols) row[c] = from_float<T>(f[e]);
    }
  }
}

// ---- reductions (deterministic: fixed order for a fixed launch configuration) ----

// Sum over aligned groups of WIDTH lanes (WIDTH = 2..32, a power of two); every lane of a group
// ends with the same bits (butterfly: both partners add the same two numbers). All 32 lanes of the
// warp must call it together.
template <int WIDTH, int N>
__device__ __forceinline__ void warp_sum(float (&v)[N]) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the sums.
// smem: >= 32*N floats of shared memory. Every thread of the block must call it (two __syncthreads;
// the second lets the caller reuse smem right away).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_sum<32>(v);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = lane < nwarps ? smem[i * 32 + lane] : 0.f;
  warp_sum<32>(v);  // every warp reduces the same partials in the same order
  __syncthreads();
}

// Sum over the threads sharing a row: GROUP lanes (GROUP = 2..32) or the whole block (GROUP = 0).
template <int GROUP, int N>
__device__ __forceinline__ void group_sum(float (&v)[N], float* smem) {
  if constexpr (GROUP == 0) block_sum<N>(v, smem);
  else warp_sum<GROUP, N>(v);
}

}  // namespace fastllm::cuda
