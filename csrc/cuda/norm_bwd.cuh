// Backward kernels of LayerNorm (LN = true) and RMSNorm (LN = false), shared by layer_norm.cu and
// rms_norm.cu, with the host-side choice of launch configuration.
//
// Math, per row (n = cols, mean/rstd as saved by the forward; RMSNorm: mean = 0):
//   xhat = (x - mean) * rstd, g = dy * w (w == nullptr: g = dy)
//   LN:  dx = rstd * (g - sum(g)/n - xhat * sum(g*xhat)/n)
//   RMS: dx = rstd * (g - xhat * sum(g*xhat)/n) + dextra   (dextra optional, its own row stride)
//   dw[j] = sum_rows dy*xhat, db[j] = sum_rows dy (LN) - fp32, overwritten, deterministic.
// dx == nullptr / dw == nullptr / db == nullptr: that output is skipped.
//
// Weight gradients: the kernels grid-stride over rows with a fixed column set per thread, so each
// thread accumulates dw/db of its columns over all rows it visits (in registers; in the uncached
// kernel partly in shared memory); at the end each block writes one partial row per gradient
// to the workspace: ws[p*cols + j] (dw), ws[(P + p)*cols + j] (db), p = blockIdx.x < P = gridDim.x.
// norm_bwd_reduce.cu then sums the P partial rows in a fixed order (no float atomics).
//
// Launch scheme (8 row elements per thread cached as xhat and g, plus 8 accumulators each):
//   cols <= 256:   GROUP = 4/8/16/32 lanes per row, 128-thread blocks; the groups of a block sum
//                  their accumulators through shared memory before writing the block's partial row;
//   cols <= 8192:  a block per row, block size the multiple of 32 covering the row (64..1024);
//   cols >  8192:  uncached: 1024-thread blocks (fewer when the device's shared memory is small)
//                  handle a chunk of CW = threads*32 columns each (grid.y = chunks, usually 1);
//                  pass 1 reads the whole row (x, dy, w) for the row sums, pass 2 re-reads the
//                  block's chunk (L2 hits), writes dx and accumulates dw (16 (fp32) or 8 per
//                  thread in registers, the rest in dynamic shared memory) and db (32 per thread
//                  in shared memory): <= 224 KiB for LN at 1024 threads, so one chunk up to 32768
//                  cols on H100 (227 KiB opt-in); smaller devices use fewer threads and chunks.
// Grid: P = min(resident blocks (/ chunks), row groups, max_partials(cols)) blocks.
#pragma once
#include "norm_fwd.cuh"

namespace fastllm::cuda::norm {

constexpr int kBwdElems = 8;      // row elements per thread, cached kernels
constexpr int kBigElems = 32;     // row elements per thread and chunk, uncached kernel
// of which dw accumulates in registers (the rest in shared memory): 16 fp32, 8 for 16-bit types
// (their slots are twice as wide in registers while loading, and 16 spills at 64 registers)
template <typename T>
constexpr int big_reg_elems() { return sizeof(T) == 4 ? 16 : 8; }

// Upper bound of the partial rows P the backward kernels use for `cols`: at most 2^23 partial
// floats per gradient and at most 1024 rows, but at least one row, so the workspace stays
// <= 64 MiB for cols <= 2^23 (and is 2*cols floats beyond). Device independent, so
// norm_bwd_workspace_floats needs no GPU.
constexpr int64_t max_partials(int64_t cols) {
  const int64_t p = (int64_t(1) << 23) / (cols < 1 ? 1 : cols);
  return p < 1 ? 1 : (p > 1024 ? 1024 : p);
}

// dw[j] = sum_p ws[p*cols + j], db[j] = sum_p ws[(parts + p)*cols + j]; either may be nullptr.
void launch_partials_reduce(const float* ws, int parts, int cols, float* dw, float* db, cudaStream_t st);

struct BwdArgs {
  const void* dy; int64_t dys;
  const void* x; int64_t xs;
  const void* w;
  const float* mean;              // LN only
  const float* rstd;
  const void* dextra; int64_t des;  // RMS only, may be nullptr
  void* dx; int64_t dxs;          // may be nullptr
  float* ws;                      // partial sums, see above
  int need_dw, need_db;
  int64_t rows;
  int cols;
};

// Writes one partial row (columns of this thread's slots) to out. In the warp-group layout the
// block's groups share columns: their accumulators are summed in group order through shared memory.
template <int GROUP, bool VEC, int PACKS, int V>
__device__ __forceinline__ void write_partial(const float (&acc)[PACKS][V], float* out, int cols,
                                              const RowGroup<GROUP>& g) {
  if constexpr (GROUP == 0) {
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int c = slot_col<VEC, V>(k, e, g.t, g.nt);
        if (c < cols) out[c] = acc[k][e];
      }
  } else {
    static_assert(PACKS * V <= kBwdElems, "combine buffer holds kWarpBlock * kBwdElems floats");
    __shared__ float comb[kWarpBlock * kBwdElems];  // groups * cols <= blockDim * PACKS * V
    const int groups = blockDim.x / GROUP, gi = threadIdx.x / GROUP;
    __syncthreads();  // a previous call may still be reading comb
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int c = slot_col<VEC, V>(k, e, g.t, g.nt);
        if (c < cols) comb[gi * cols + c] = acc[k][e];
      }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float s = 0.f;
      for (int i = 0; i < groups; ++i) s += comb[i * cols + c];
      out[c] = s;
    }
  }
}

// Rows cached in registers (as xhat and g) between the row reduction and dx.
template <typename T, bool LN, int GROUP, int PACKS, bool VEC>
__global__ void __launch_bounds__(kMaxBlock) norm_bwd_cached(BwdArgs a) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr int NS = LN ? 2 : 1;  // row sums: [sum(g),] sum(g*xhat)
  __shared__ float red[64];
  const RowGroup<GROUP> g = RowGroup<GROUP>::make();
  const int cols = a.cols;
  const float inv_n = 1.f / static_cast<float>(cols);
  const T* W = static_cast<const T*>(a.w);
  float aw[PACKS][V], ab[LN ? PACKS : 1][V];
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) {
      aw[k][e] = 0.f;
      if constexpr (LN) ab[k][e] = 0.f;
    }

  for (int64_t r0 = g.first; r0 < a.rows; r0 += g.step) {
    const int64_t row = r0 + g.sub;
    const bool valid = row < a.rows;
    float xh[PACKS][V], gg[PACKS][V];  // x then xhat; dy then g
    float mean = 0.f, rstd = 0.f;
    if (valid) {
      const T* X = static_cast<const T*>(a.x) + row * a.xs;
      const T* DY = static_cast<const T*>(a.dy) + row * a.dys;
#pragma unroll
      for (int k = 0; k < PACKS; ++k) {
        load_slot<T, VEC>(X, cols, k, g.t, g.nt, xh[k]);
        load_slot<T, VEC>(DY, cols, k, g.t, g.nt, gg[k]);
      }
      if constexpr (LN) mean = a.mean[row];
      rstd = a.rstd[row];
    } else {  // zeros: contributes nothing to the sums or the accumulators
#pragma unroll
      for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) xh[k][e] = gg[k][e] = 0.f;
    }
    float s[NS];
#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] = 0.f;
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
      float wv[V];
      load_slot_or<T, VEC>(W, 1.f, cols, k, g.t, g.nt, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) {  // columns past the row: dy = 0, so every term below is 0
        const float xhat = (xh[k][e] - mean) * rstd;
        const float d = gg[k][e];
        const float gv = d * wv[e];
        aw[k][e] += d * xhat;
        if constexpr (LN) {
          ab[k][e] += d;
          s[0] += gv;
        }
        s[NS - 1] += gv * xhat;
        xh[k][e] = xhat;
        gg[k][e] = gv;
      }
    }
    group_sum<GROUP>(s, red);
    if (valid && a.dx != nullptr) {
      const float c1 = LN ? s[0] * inv_n : 0.f, c2 = s[NS - 1] * inv_n;
      T* DX = static_cast<T*>(a.dx) + row * a.dxs;
      const T* DE = (!LN && a.dextra != nullptr) ? static_cast<const T*>(a.dextra) + row * a.des : nullptr;
#pragma unroll
      for (int k = 0; k < PACKS; ++k) {
        float o[V], de[V];
        load_slot_or<T, VEC>(DE, 0.f, cols, k, g.t, g.nt, de);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = rstd * (gg[k][e] - c1 - xh[k][e] * c2) + de[e];
        store_slot<T, VEC>(DX, cols, k, g.t, g.nt, o);
      }
    }
  }
  const int64_t P = gridDim.x;
  if (a.need_dw) write_partial<GROUP, VEC>(aw, a.ws + int64_t(blockIdx.x) * cols, cols, g);
  if constexpr (LN) {
    if (a.need_db) write_partial<GROUP, VEC>(ab, a.ws + (P + blockIdx.x) * cols, cols, g);
  }
}

// Uncached: see the header comment. Thread t's chunk slots are k < PK = kBigElems / V. Its dw
// accumulators of slots k < PKR live in registers, those of slots k >= PKR in shared memory at
// sw[((k - PKR)*V + e)*nt + t], and its db accumulators at sb[(k*V + e)*nt + t] (conflict-free,
// private to t: no barrier). Dynamic shared memory: [sw if need_dw][sb if LN && need_db].
template <typename T, bool LN, bool VEC>
__global__ void __launch_bounds__(kMaxBlock) norm_bwd_looped(BwdArgs a) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr int PK = kBigElems / V;
  constexpr int PKR = big_reg_elems<T>() / V;
  constexpr int NS = LN ? 2 : 1;
  extern __shared__ float acc_smem[];
  __shared__ float red[64];
  const int t = threadIdx.x, nt = blockDim.x, cols = a.cols;
  const int cbase = blockIdx.y * nt * kBigElems;
  const float inv_n = 1.f / static_cast<float>(cols);
  const bool do_w = a.need_dw != 0, do_b = LN && a.need_db;
  float* sw = acc_smem;
  float* sb = acc_smem + (do_w ? (kBigElems - big_reg_elems<T>()) * nt : 0);
  const T* W = static_cast<const T*>(a.w);
  float aw[PKR][V];
#pragma unroll
  for (int k = 0; k < PK; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (k < PKR) aw[k < PKR ? k : 0][e] = 0.f;
      else if (do_w) sw[((k - PKR) * V + e) * nt + t] = 0.f;
      if (do_b) sb[(k * V + e) * nt + t] = 0.f;
    }

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* X = static_cast<const T*>(a.x) + row * a.xs;
    const T* DY = static_cast<const T*>(a.dy) + row * a.dys;
    const float mean = LN ? a.mean[row] : 0.f;
    const float rstd = a.rstd[row];
    float s[NS];
#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] = 0.f;
    // pass 1: the whole row (any thread-to-column map works for the sums)
#pragma unroll 4
    for (int j = 0; slot_col<VEC, V>(j, 0, t, nt) < cols; ++j) {
      float xv[V], dv[V], wv[V];
      load_slot<T, VEC>(X, cols, j, t, nt, xv);
      load_slot<T, VEC>(DY, cols, j, t, nt, dv);
      load_slot_or<T, VEC>(W, 1.f, cols, j, t, nt, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) {  // columns past the row: dy = 0
        const float xhat = (xv[e] - mean) * rstd;
        const float gv = dv[e] * wv[e];
        if constexpr (LN) s[0] += gv;
        s[NS - 1] += gv * xhat;
      }
    }
    block_sum(s, red);
    const float c1 = LN ? s[0] * inv_n : 0.f, c2 = s[NS - 1] * inv_n;
    // pass 2: this block's chunk of columns [cbase, cbase + nt*kBigElems)
    const int ccols = cols - cbase;
    T* DX = a.dx != nullptr ? static_cast<T*>(a.dx) + row * a.dxs + cbase : nullptr;
    const T* DE = (!LN && a.dextra != nullptr) ? static_cast<const T*>(a.dextra) + row * a.des + cbase : nullptr;
#pragma unroll
    for (int k = 0; k < PK; ++k) {
      float xv[V], dv[V], wv[V], de[V], o[V];
      load_slot<T, VEC>(X + cbase, ccols, k, t, nt, xv);
      load_slot<T, VEC>(DY + cbase, ccols, k, t, nt, dv);
      load_slot_or<T, VEC>(W ? W + cbase : nullptr, 1.f, ccols, k, t, nt, wv);
      load_slot_or<T, VEC>(DE, 0.f, ccols, k, t, nt, de);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xhat = (xv[e] - mean) * rstd;
        o[e] = rstd * (dv[e] * wv[e] - c1 - xhat * c2) + de[e];
        if (k < PKR) aw[k < PKR ? k : 0][e] += dv[e] * xhat;
        else if (do_w) sw[((k - PKR) * V + e) * nt + t] += dv[e] * xhat;
        if (do_b) sb[(k * V + e) * nt + t] += dv[e];
      }
      if (DX != nullptr) store_slot<T, VEC>(DX, ccols, k, t, nt, o);
    }
  }
  const int64_t P = gridDim.x;
#pragma unroll
  for (int k = 0; k < PK; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int c = slot_col<VEC, V>(k, e, t, nt);  // < nt*kBigElems
      if (c < cols - cbase) {
        if (do_w) a.ws[int64_t(blockIdx.x) * cols + cbase + c] = k < PKR ? aw[k < PKR ? k : 0][e] : sw[((k - PKR) * V + e) * nt + t];
        if (do_b) a.ws[(P + blockIdx.x) * cols + cbase + c] = sb[(k * V + e) * nt + t];
      }
    }
}

// ---------------------------------------- host side ----------------------------------------

inline void reduce_partials(const BwdArgs& a, int parts, float* dw, float* db, cudaStream_t st) {
  if (a.need_dw || a.need_db)
    launch_partials_reduce(a.ws, parts, a.cols, a.need_dw ? dw : nullptr, a.need_db ? db : nullptr, st);
}

template <typename T, bool LN, int GROUP, int PACKS, bool VEC>
void run_bwd_cached(const char* name, const BwdArgs& a, int block, float* dw, float* db, cudaStream_t st) {
  auto* kernel = norm_bwd_cached<T, LN, GROUP, PACKS, VEC>;
  const int64_t rows_per_block = GROUP == 0 ? 1 : block / GROUP;
  int64_t grid = std::min(ceil_div(a.rows, rows_per_block), resident_blocks(kernel, block, 0));
  grid = std::min(grid, max_partials(a.cols));
  launch_kernel(name, kernel, dim3(static_cast<unsigned>(grid)), dim3(block), 0, st, a);
  reduce_partials(a, static_cast<int>(grid), dw, db, st);
}

template <typename T, bool LN, bool VEC>
void run_bwd_looped(const char* name, const BwdArgs& a, float* dw, float* db, cudaStream_t st) {
  auto* kernel = norm_bwd_looped<T, LN, VEC>;
  // shared accumulators per thread: dw of the slots past big_reg_elems, db (LN) of every slot
  const int smem_per_thread = 4 * ((a.need_dw ? kBigElems - big_reg_elems<T>() : 0) + (LN && a.need_db ? kBigElems : 0));
  int max_threads = kMaxBlock;
  if (smem_per_thread > 0) {
    const int avail = device_info().max_smem_optin - 1024;  // room for the static red[] buffer
    max_threads = std::min<int>(kMaxBlock, avail / smem_per_thread / 32 * 32);
    if (max_threads < 32) throw std::runtime_error(std::string("fastllm._C: ") + name + ": too little shared memory");
    if (avail > 48 * 1024)  // the device maximum on every call: no race between host threads
      check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, avail),
                 "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  const int64_t chunks = ceil_div(a.cols, int64_t(max_threads) * kBigElems);
  if (chunks > 65535) throw std::runtime_error(std::string("fastllm._C: ") + name + ": row too long for this device");
  const int threads = static_cast<int>(round_up(ceil_div(ceil_div(a.cols, chunks), kBigElems), 32));
  const size_t smem = size_t(threads) * smem_per_thread;
  int64_t grid = std::max<int64_t>(1, resident_blocks(kernel, threads, smem) / chunks);
  grid = std::min({grid, a.rows, max_partials(a.cols)});
  launch_kernel(name, kernel, dim3(static_cast<unsigned>(grid), static_cast<unsigned>(chunks)), dim3(threads),
                smem, st, a);
  reduce_partials(a, static_cast<int>(grid), dw, db, st);
}

template <typename T, bool LN, bool VEC>
void bwd_dispatch(const char* name, const BwdArgs& a, float* dw, float* db, cudaStream_t st) {
  constexpr int V = ElemTraits<T>::kVec;
  constexpr int PB = kBwdElems / V;  // slots per thread: fp32 2, 16-bit 1
  const int cols = a.cols;
  if (cols <= 32 * kBwdElems) {
    const int lanes = static_cast<int>(ceil_div(cols, kBwdElems));
    if (lanes <= 4) run_bwd_cached<T, LN, 4, PB, VEC>(name, a, kWarpBlock, dw, db, st);
    else if (lanes <= 8) run_bwd_cached<T, LN, 8, PB, VEC>(name, a, kWarpBlock, dw, db, st);
    else if (lanes <= 16) run_bwd_cached<T, LN, 16, PB, VEC>(name, a, kWarpBlock, dw, db, st);
    else run_bwd_cached<T, LN, 32, PB, VEC>(name, a, kWarpBlock, dw, db, st);
  } else if (cols <= kMaxBlock * kBwdElems) {
    const int block = static_cast<int>(round_up(ceil_div(cols, kBwdElems), 32));
    run_bwd_cached<T, LN, 0, PB, VEC>(name, a, block, dw, db, st);
  } else {
    run_bwd_looped<T, LN, VEC>(name, a, dw, db, st);
  }
}

template <typename T, bool LN>
void bwd_typed(const char* name, const BwdArgs& a, float* dw, float* db, cudaStream_t st) {
  const bool vec = rows_aligned16<T>(a.dy, a.dys, a.rows) && rows_aligned16<T>(a.x, a.xs, a.rows) &&
                   rows_aligned16<T>(a.dx, a.dxs, a.rows) && rows_aligned16<T>(a.dextra, a.des, a.rows) &&
                   rows_aligned16<T>(a.w, 0, 1);
  if (vec) bwd_dispatch<T, LN, true>(name, a, dw, db, st);
  else bwd_dispatch<T, LN, false>(name, a, dw, db, st);
}

// Entry: rows == 0 (or nothing requested) returns before any CUDA call; dw/db are then untouched.
template <bool LN>
void bwd_entry(const char* name, BwdArgs a, int64_t cols, float* dw, float* db, DType dt, uintptr_t stream) {
  if (a.rows <= 0) return;
  check_cols(cols);
  a.cols = static_cast<int>(cols);
  a.need_dw = dw != nullptr;
  a.need_db = LN && db != nullptr;
  if (a.dx == nullptr && !a.need_dw && !a.need_db) return;
  if ((a.need_dw || a.need_db) && a.ws == nullptr)
    throw std::invalid_argument(std::string("fastllm._C: ") + name + ": workspace must not be null");
  const cudaStream_t st = as_stream(stream);
  switch (dt) {
    case DType::F32: bwd_typed<float, LN>(name, a, dw, db, st); return;
    case DType::F16: bwd_typed<__half, LN>(name, a, dw, db, st); return;
    case DType::BF16: bwd_typed<__nv_bfloat16, LN>(name, a, dw, db, st); return;
  }
  throw std::invalid_argument(std::string("fastllm._C: ") + name + ": unknown dtype");
}

}  // namespace fastllm::cuda::norm
