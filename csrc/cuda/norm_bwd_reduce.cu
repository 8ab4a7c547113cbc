// Second stage of the LayerNorm / RMSNorm weight gradients, and the workspace size.
//
// The backward kernels (norm_bwd.cuh) leave P partial rows per gradient in the workspace:
//   ws[p*cols + j] (dw), ws[(P + p)*cols + j] (db), p < P.
// Here dw[j] = sum_p ws[p*cols + j] and db[j] = sum_p ws[(P + p)*cols + j], overwriting dw/db.
// Launch: blocks of 32 x 32 threads; blockIdx.x picks 32 consecutive columns (coalesced reads),
// blockIdx.y the gradient (0 dw, 1 db); thread (x, y) sums rows p = y, y+32, ... of column x, then
// thread row 0 adds the 32 partial sums in order. Fixed order: deterministic.
#include <algorithm>

#include "norm_bwd.cuh"
#include "ops.h"

namespace fastllm::cuda {

int64_t norm_bwd_workspace_floats(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return 2 * std::min(rows, norm::max_partials(cols)) * cols;
}

namespace norm {
namespace {

constexpr int kReduceTile = 32;

__global__ void __launch_bounds__(kReduceTile * kReduceTile)
    partials_reduce_kernel(const float* ws, int parts, int cols, float* dw, float* db) {
  __shared__ float part[kReduceTile][kReduceTile + 1];
  float* out = blockIdx.y == 0 ? dw : db;
  if (out == nullptr) return;  // uniform over the block, before any barrier
  const float* src = ws + (blockIdx.y == 0 ? int64_t(0) : int64_t(parts) * cols);
  const int c = blockIdx.x * kReduceTile + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
#pragma unroll 4
    for (int p = threadIdx.y; p < parts; p += kReduceTile) s += src[int64_t(p) * cols + c];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kReduceTile; ++i) total += part[i][threadIdx.x];
    out[c] = total;
  }
}

}  // namespace

void launch_partials_reduce(const float* ws, int parts, int cols, float* dw, float* db, cudaStream_t st) {
  if (dw == nullptr && db == nullptr) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kReduceTile)), db != nullptr ? 2u : 1u);
  launch_kernel("norm_bwd_partials_reduce", partials_reduce_kernel, grid, dim3(kReduceTile, kReduceTile), 0, st,
                ws, parts, cols, dw, db);
}

}  // namespace norm
}  // namespace fastllm::cuda
