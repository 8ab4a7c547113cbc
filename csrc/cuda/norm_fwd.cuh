// Forward kernels of LayerNorm, RMSNorm and fused residual-add + RMSNorm (shared by layer_norm.cu
// and rms_norm.cu), with the host-side choice of launch configuration.
//
// Math, per row of n = cols elements (fp32 arithmetic, fp32 statistics):
//   LayerNorm: mu = sum(x)/n; d1 = sum(x - mu), d2 = sum((x - mu)^2) over the row kept in registers
//              (a second pass, no cancellation when |mean| >> std); mean = mu + d1/n (one refinement
//              step, as the reference), var = d2/n - (d1/n)^2 (exact identity, d1 tiny);
//              rstd = rsqrt(var + eps); y = (x - mean) * rstd * w + b.
//   RMSNorm:   rstd = rsqrt(sum(x^2)/n + eps); y = x * rstd * w.
//   Add+RMS:   s = round_to_dtype(x + r) is stored, then RMSNorm of the rounded s.
// w == nullptr means weight 1, b == nullptr bias 0; mean/rstd == nullptr: not stored.
//
// Launch scheme (V = 16 / sizeof(T) elements per 128-bit access; the row is cached on chip, so
// each element is read from and written to global memory exactly once):
//   cols <= 32*V:   GROUP = 4/8/16/32 lanes per row (smallest covering the row with one slot per
//                   lane), 128-thread blocks, several rows per warp; row in registers;
//   cols <= 1024:   a warp per row, 2/4/8 slots per lane, 128-thread blocks; row in registers;
//   cols <= 16384:  a block per row, 32 elements per thread in registers (32/V slots), block size
//                   the multiple of 32 covering the row (64..512, up to 128 registers per thread);
//   larger rows:    a block per row; the row is kept in dynamic shared memory (cols * sizeof(T)
//                   bytes; 512 threads when two blocks fit on an SM, else 1024) when the device
//                   allows it, else re-read from global memory (L2) in each pass (3 passes
//                   LayerNorm, 2 RMSNorm) by 1024 threads.
// Grids: min(row groups, resident blocks * 16) blocks, grid-stride over rows; the shared-memory /
// re-reading kernel: min(rows, resident blocks). 128-bit accesses when every base pointer and row
// stride allows it (VEC), else coalesced element accesses.
#pragma once
#include <stdexcept>
#include <string>

#include "../common/dtype.h"
#include "common.cuh"

namespace fastllm::cuda::norm {

enum class Op { kLayer, kRms, kAddRms };

constexpr int kWarpBlock = 128;          // block size of the kernels where lanes of a warp share a row
constexpr int kMaxBlock = 1024;          // block size limit
constexpr int kFwdElems = 32;            // row elements cached per thread in the forward kernels
constexpr int kFwdRegBlock = 512;        // largest block of the register-cached forward kernel
constexpr int kGridOversub = 16;         // forward grid cap: resident blocks times this
constexpr int64_t kMaxCols = 1 << 30;    // keeps every in-row index in int

inline void check_cols(int64_t cols) {
  if (cols < 1 || cols > kMaxCols)
    throw std::invalid_argument("fastllm._C: CUDA norm kernels need 1 <= cols <= 2^30, got " + std::to_string(cols));
}

struct FwdArgs {
  const void* x; int64_t xs;
  const void* r; int64_t rs;  // residual (kAddRms)
  void* s; int64_t ss;        // x + r, rounded (kAddRms)
  const void* w;
  const void* b;              // kLayer only
  void* y; int64_t ys;
  float* mean;                // kLayer only
  float* rstd;
  int64_t rows;
  int cols;
  float eps;
};

// Row held in registers: thread g.t keeps PACKS slots (PACKS*V elements) of its row.
template <typename T, Op OP, int GROUP, int PACKS, bool VEC>
__global__ void __launch_bounds__(GROUP ? kWarpBlock : kFwdRegBlock, GROUP ? 4 : 1) norm_fwd_cached(FwdArgs a) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr bool LN = OP == Op::kLayer;
  __shared__ float red[64];
  const RowGroup<GROUP> g = RowGroup<GROUP>::make();
  const int cols = a.cols;
  const float inv_n = 1.f / static_cast<float>(cols);
  const T* X = static_cast<const T*>(a.x);
  const T* W = static_cast<const T*>(a.w);
  const T* B = static_cast<const T*>(a.b);
  T* Y = static_cast<T*>(a.y);

  for (int64_t r0 = g.first; r0 < a.rows; r0 += g.step) {
    const int64_t row = r0 + g.sub;
    const bool valid = row < a.rows;
    float v[PACKS][V];
    if (valid) {
#pragma unroll
      for (int k = 0; k < PACKS; ++k) load_slot<T, VEC>(X + row * a.xs, cols, k, g.t, g.nt, v[k]);
      if constexpr (OP == Op::kAddRms) {
        const T* R = static_cast<const T*>(a.r) + row * a.rs;
        T* S = static_cast<T*>(a.s) + row * a.ss;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
          float rv[V];
          load_slot<T, VEC>(R, cols, k, g.t, g.nt, rv);
#pragma unroll
          for (int e = 0; e < V; ++e) v[k][e] = round_to<T>(v[k][e] + rv[e]);
          store_slot<T, VEC>(S, cols, k, g.t, g.nt, v[k]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) v[k][e] = 0.f;
    }

    float mean = 0.f, var;
    if constexpr (LN) {
      float s[1] = {0.f};
#pragma unroll
      for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) s[0] += v[k][e];
      group_sum<GROUP>(s, red);
      const float mu = s[0] * inv_n;
      float d[2] = {0.f, 0.f};
#pragma unroll
      for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float dv = slot_col<VEC, V>(k, e, g.t, g.nt) < cols ? v[k][e] - mu : 0.f;
          d[0] += dv;
          d[1] += dv * dv;
        }
      group_sum<GROUP>(d, red);
      const float m1 = d[0] * inv_n;
      mean = mu + m1;
      var = fmaxf(d[1] * inv_n - m1 * m1, 0.f);
    } else {
      float q[1] = {0.f};  // columns past the row hold 0
#pragma unroll
      for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) q[0] += v[k][e] * v[k][e];
      group_sum<GROUP>(q, red);
      var = q[0] * inv_n;
    }
    const float rstd = rsqrtf(var + a.eps);

    if (valid) {
      if (g.t == 0) {
        if (LN && a.mean != nullptr) a.mean[row] = mean;
        if (a.rstd != nullptr) a.rstd[row] = rstd;
      }
#pragma unroll
      for (int k = 0; k < PACKS; ++k) {
        float wv[V], o[V];
        load_slot_or<T, VEC>(W, 1.f, cols, k, g.t, g.nt, wv);
        if constexpr (LN) {
          float bv[V];
          load_slot_or<T, VEC>(B, 0.f, cols, k, g.t, g.nt, bv);
#pragma unroll
          for (int e = 0; e < V; ++e) o[e] = (v[k][e] - mean) * rstd * wv[e] + bv[e];
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) o[e] = v[k][e] * rstd * wv[e];
        }
        store_slot<T, VEC>(Y + row * a.ys, cols, k, g.t, g.nt, o);
      }
    }
  }
}

// Rows too long for registers: one block per row. SMEM: the first pass keeps the row (x, or the
// rounded s for kAddRms) in dynamic shared memory, cols * sizeof(T) bytes, in the global layout;
// each thread reads back only what it wrote itself, so no barrier is needed. !SMEM: every pass
// re-reads the row from global memory (for kAddRms, s, which each thread wrote itself).
template <typename T, Op OP, bool VEC, bool SMEM>
__global__ void __launch_bounds__(kMaxBlock) norm_fwd_looped(FwdArgs a) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr bool LN = OP == Op::kLayer;
  extern __shared__ __align__(16) unsigned char row_smem[];
  __shared__ float red[64];
  const int t = threadIdx.x, nt = blockDim.x, cols = a.cols;
  const float inv_n = 1.f / static_cast<float>(cols);
  const T* W = static_cast<const T*>(a.w);
  const T* B = static_cast<const T*>(a.b);
  T* cache = reinterpret_cast<T*>(row_smem);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* X = static_cast<const T*>(a.x) + row * a.xs;
    T* Y = static_cast<T*>(a.y) + row * a.ys;
    const T* R = nullptr;
    T* S = nullptr;
    if constexpr (OP == Op::kAddRms) {
      R = static_cast<const T*>(a.r) + row * a.rs;
      S = static_cast<T*>(a.s) + row * a.ss;
    }
    // source of the passes after the first: the cache, s, or x
    const T* src = SMEM ? cache : (OP == Op::kAddRms ? S : X);

    // pass 1: sum(x) (LN) or sum(s^2) (RMS); fills the cache / writes s
    float s1[1] = {0.f};
#pragma unroll 8
    for (int j = 0; slot_col<VEC, V>(j, 0, t, nt) < cols; ++j) {
      float v[V];
      load_slot<T, VEC>(X, cols, j, t, nt, v);
      if constexpr (OP == Op::kAddRms) {
        float rv[V];
        load_slot<T, VEC>(R, cols, j, t, nt, rv);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = round_to<T>(v[e] + rv[e]);
        store_slot<T, VEC>(S, cols, j, t, nt, v);
      }
      if constexpr (SMEM) store_slot<T, VEC>(cache, cols, j, t, nt, v);
#pragma unroll
      for (int e = 0; e < V; ++e) s1[0] += LN ? v[e] : v[e] * v[e];
    }
    block_sum(s1, red);

    float mean = 0.f, var;
    if constexpr (LN) {  // pass 2: centred sums
      const float mu = s1[0] * inv_n;
      float d[2] = {0.f, 0.f};
#pragma unroll 4
      for (int j = 0; slot_col<VEC, V>(j, 0, t, nt) < cols; ++j) {
        float v[V];
        load_slot<T, VEC>(src, cols, j, t, nt, v);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float dv = slot_col<VEC, V>(j, e, t, nt) < cols ? v[e] - mu : 0.f;
          d[0] += dv;
          d[1] += dv * dv;
        }
      }
      block_sum(d, red);
      const float m1 = d[0] * inv_n;
      mean = mu + m1;
      var = fmaxf(d[1] * inv_n - m1 * m1, 0.f);
    } else {
      var = s1[0] * inv_n;
    }
    const float rstd = rsqrtf(var + a.eps);
    if (t == 0) {
      if (LN && a.mean != nullptr) a.mean[row] = mean;
      if (a.rstd != nullptr) a.rstd[row] = rstd;
    }
    // last pass: output
#pragma unroll 4
    for (int j = 0; slot_col<VEC, V>(j, 0, t, nt) < cols; ++j) {
      float v[V], wv[V], o[V];
      load_slot<T, VEC>(src, cols, j, t, nt, v);
      load_slot_or<T, VEC>(W, 1.f, cols, j, t, nt, wv);
      if constexpr (LN) {
        float bv[V];
        load_slot_or<T, VEC>(B, 0.f, cols, j, t, nt, bv);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = (v[e] - mean) * rstd * wv[e] + bv[e];
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = v[e] * rstd * wv[e];
      }
      store_slot<T, VEC>(Y, cols, j, t, nt, o);
    }
  }
}

// ---------------------------------------- host side ----------------------------------------

template <typename T, Op OP, int GROUP, int PACKS, bool VEC>
void run_fwd_cached(const char* name, const FwdArgs& a, int block, cudaStream_t st) {
  auto* kernel = norm_fwd_cached<T, OP, GROUP, PACKS, VEC>;
  const int64_t rows_per_block = GROUP == 0 ? 1 : block / GROUP;
  const int64_t want = ceil_div(a.rows, rows_per_block);
  const int64_t grid = std::min(want, resident_blocks(kernel, block, 0) * kGridOversub);
  launch_kernel(name, kernel, dim3(static_cast<unsigned>(grid)), dim3(block), 0, st, a);
}

template <typename T, Op OP, bool VEC, bool SMEM>
void run_fwd_looped(const char* name, const FwdArgs& a, size_t smem, int max_smem, cudaStream_t st) {
  auto* kernel = norm_fwd_looped<T, OP, VEC, SMEM>;
  if (SMEM && max_smem > 48 * 1024)  // always the device maximum: no race between host threads
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  // 512 threads when two such blocks fit on an SM (two rows in flight; 1024 threads x ~60 registers
  // fill the register file), else 1024 threads (more of the single row's loads in flight)
  const int block = SMEM && max_blocks_per_sm(reinterpret_cast<const void*>(kernel), 512, smem) >= 2 ? 512 : kMaxBlock;
  const int64_t grid = std::min<int64_t>(a.rows, resident_blocks(kernel, block, smem));
  launch_kernel(name, kernel, dim3(static_cast<unsigned>(grid)), dim3(block), smem, st, a);
}

template <typename T, Op OP, bool VEC>
void fwd_dispatch(const char* name, const FwdArgs& a, cudaStream_t st) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr int MAXP = kFwdElems / V;  // slots per thread at most: fp32 8, 16-bit 4
  const int cols = a.cols;
  if (cols <= 32 * V) {  // one slot per lane, 4..32 lanes per row
    const int lanes = static_cast<int>(ceil_div(cols, V));
    if (lanes <= 4) run_fwd_cached<T, OP, 4, 1, VEC>(name, a, kWarpBlock, st);
    else if (lanes <= 8) run_fwd_cached<T, OP, 8, 1, VEC>(name, a, kWarpBlock, st);
    else if (lanes <= 16) run_fwd_cached<T, OP, 16, 1, VEC>(name, a, kWarpBlock, st);
    else run_fwd_cached<T, OP, 32, 1, VEC>(name, a, kWarpBlock, st);
  } else if (cols <= 32 * kFwdElems) {  // a warp per row
    const int packs = static_cast<int>(ceil_div(cols, 32 * V));
    if (packs <= 2) run_fwd_cached<T, OP, 32, 2, VEC>(name, a, kWarpBlock, st);
    else if (packs <= 4) run_fwd_cached<T, OP, 32, 4, VEC>(name, a, kWarpBlock, st);
    else run_fwd_cached<T, OP, 32, MAXP, VEC>(name, a, kWarpBlock, st);
  } else if (cols <= kFwdRegBlock * kFwdElems) {  // a block per row, registers
    const int block = static_cast<int>(round_up(ceil_div(cols, kFwdElems), 32));
    run_fwd_cached<T, OP, 0, MAXP, VEC>(name, a, block, st);
  } else {  // a block per row, shared memory if it fits
    const size_t bytes = static_cast<size_t>(round_up(int64_t(cols) * int64_t(sizeof(T)), 16));
    const int avail = device_info().max_smem_optin - 1024;  // room for the static red[] buffer
    if (bytes <= static_cast<size_t>(avail)) run_fwd_looped<T, OP, VEC, true>(name, a, bytes, avail, st);
    else run_fwd_looped<T, OP, VEC, false>(name, a, 0, avail, st);
  }
}

template <typename T, Op OP>
void fwd_typed(const char* name, const FwdArgs& a, cudaStream_t st) {
  bool vec = rows_aligned16<T>(a.x, a.xs, a.rows) && rows_aligned16<T>(a.y, a.ys, a.rows) &&
             rows_aligned16<T>(a.w, 0, 1) && rows_aligned16<T>(a.b, 0, 1);
  if (OP == Op::kAddRms) vec = vec && rows_aligned16<T>(a.r, a.rs, a.rows) && rows_aligned16<T>(a.s, a.ss, a.rows);
  if (vec) fwd_dispatch<T, OP, true>(name, a, st);
  else fwd_dispatch<T, OP, false>(name, a, st);
}

// Entry: validates nothing the bindings already check; rows == 0 returns before any CUDA call.
template <Op OP>
void fwd_entry(const char* name, FwdArgs a, int64_t cols, DType dt, uintptr_t stream) {
  if (a.rows <= 0) return;
  check_cols(cols);
  a.cols = static_cast<int>(cols);
  const cudaStream_t st = as_stream(stream);
  switch (dt) {
    case DType::F32: fwd_typed<float, OP>(name, a, st); return;
    case DType::F16: fwd_typed<__half, OP>(name, a, st); return;
    case DType::BF16: fwd_typed<__nv_bfloat16, OP>(name, a, st); return;
  }
  throw std::invalid_argument(std::string("fastllm._C: ") + name + ": unknown dtype");
}

}  // namespace fastllm::cuda::norm
