// Private to the CPU qmatmul GEMMs (prefill: many rows of x): float activations (qmatmul_gemm_float.h, on 8 or
// 16 lanes), int8 activations (qmatmul_gemm_int8_avx512.cpp) and bfloat16 ones (qmatmul_gemm_avx512bf16.cpp). They
// share the driver below and differ in how they pack x, load a tile's weights and multiply (their micro-kernels).
#pragma once
#include <algorithm>
#include <vector>

#include "kernels.h"

namespace fastllm::cpu {
namespace {

// The GEMMs take at most this many rows of x per pass, so that a tile's outputs and a K chunk of the packed x
// stay in L2 (each pass dequantises the weights again). M = 512-2048 on SmolLM2's shapes, 2 Zen 4 cores:
// float activations 103-182 -> 174-187 GFLOP/s, int8 activations 302-401 -> 352-425.
constexpr int64_t kMaxPassRows = 256;

// f(p) for each pass of at most kMaxPassRows rows, p = a offset to the pass's rows (x, its int8 form, y);
// false (nothing run) when a fits one pass.
template <typename Fn>
inline bool in_row_passes(const QMatmulArgs& a, Fn&& f) {
  if (a.m <= kMaxPassRows) return false;
  const int64_t nb = a.k / 32, ng = a.k / a.group;
  for (int64_t i0 = 0; i0 < a.m; i0 += kMaxPassRows) {
    QMatmulArgs p = a;
    p.m = std::min(kMaxPassRows, a.m - i0);
    if (a.xf) p.xf = a.xf + i0 * a.xf_stride;
    if (a.xbf) p.xbf = a.xbf + i0 * a.xf_stride;
    if (a.qx) p.qx = a.qx + i0 * a.k, p.dx = a.dx + i0 * nb;
    if (a.sx) p.sx = a.sx + i0 * ng;
    p.y = static_cast<char*>(a.y) + i0 * a.y_stride * dtype_size(a.dt);
    f(p);
  }
  return true;
}

// The float GEMMs' panels of rows of x: `big` rows each, the last one `small` rows when at most that many are
// left; padded is the rows they span.
struct Panels {
  int64_t big, small, count, padded;
  bool small_last;
  Panels(int64_t m, int64_t big_rows, int64_t small_rows)
      : big(big_rows), small(small_rows), count((m + big_rows - 1) / big_rows),
        padded(0), small_last(m % big_rows != 0 && m % big_rows <= small_rows) {
    padded = count * big - (small_last ? big - small : 0);
  }
  int64_t rows(int64_t p) const { return small_last && p == count - 1 ? small : big; }
};

// Prefetches bytes [b0 * block_bytes, b1 * block_bytes) of the packed weight rows [j0, j0 + jn) (row_bytes
// apart) into L2: the GEMMs' next K chunk of a tile, whose rows are more streams than the hardware prefetchers
// follow. 4096 x 11008 int4 from DRAM at M = 16 on a 2-core Zen 4: float mode 13.7 -> 9.6-10.4 ms, int8 mode
// 5.3 -> 4.3-4.7, bfloat16 8.3 -> 5.2-5.4 (into L1 the int8 GEMM's 48 KiB chunks of int8 weights were slower).
inline void prefetch_rows(const void* w, int64_t row_bytes, int64_t j0, int64_t jn, int64_t b0, int64_t b1,
                          int64_t block_bytes) {
  const char* base = static_cast<const char*>(w);
  for (int64_t jj = 0; jj < jn; ++jj)
    for (int64_t o = b0 * block_bytes; o < b1 * block_bytes; o += 64)
      __builtin_prefetch(base + (j0 + jj) * row_bytes + o, 0, 2);  // (prefetcht1 on x86)
}

// Weight rows per tile of the GEMMs (each micro-kernel's rows per step, 6, 12 or 24, divides it).
constexpr int64_t kGemmTileRows = 48;

// Writes y[i][j0 + jj] = ct[jj * ldc + i] * s_jj + bias[j0 + jj] for i < m, jj < jn <= kGemmTileRows, in double
// and rounded once to dt; s is the per-channel int8 row scale (1 for the group formats).
inline void store_tile(const QMatmulArgs& a, int64_t j0, int64_t jn, const double* ct, int64_t ldc) {
  double scale[kGemmTileRows], bias[kGemmTileRows];
  for (int64_t jj = 0; jj < jn; ++jj) {
    scale[jj] = a.fmt == QFormat::I8Channel ? static_cast<const float*>(a.scales)[j0 + jj] : 1.0;
    bias[jj] = a.bias ? load_as_float(a.bias, j0 + jj, a.dt) : 0.0;
  }
  dispatch_dtype(a.dt, [&](auto dt) {  // (the dtype chosen once per tile, not per output)
    constexpr DType D = decltype(dt)::value;
    for (int64_t i = 0; i < a.m; ++i) {  // row by row: each row of y gets jn adjacent outputs
      storage_t<D>* y = static_cast<storage_t<D>*>(a.y) + i * a.y_stride + j0;
      for (int64_t jj = 0; jj < jn; ++jj)
        y[jj] = from_float<D>(static_cast<float>(ct[jj * ldc + i] * scale[jj] + bias[jj]));
    }
  });
}

// Blocks of 32 per K chunk when nb blocks are cut into chunks of at most max_k elements, all of one size.
inline int64_t equal_chunk_blocks(int64_t nb, int64_t max_k) {
  const int64_t nchunks = (nb * 32 + max_k - 1) / max_k;
  return (nb + nchunks - 1) / nchunks;
}

// The GEMMs' driver, in the manner of BLIS: y = x W^T, per pass of rows (in_row_passes):
//   x is packed once into panels (g.panels; g.pack(p) in parallel over panels);
//   each thread takes tiles of kGemmTileRows weight rows (dynamic schedule); per K chunk of g.chunk_blocks blocks
//     of 32 it loads the tile's weights into its own buffers (tile.load), prefetches the next chunk into L2 and
//     runs the micro-kernels for every panel (tile.panel), which add the chunk's sums into the tile's outputs
//     ct (double, weight-row-major, row stride panels.padded; panel p from row p * panels.big);
//   store_tile rounds each output (times the int8 row scale, plus bias) once.
// G, made as G(a) per pass, has panels, chunk_blocks, pack(p), and G::Tile, one per thread, made as Tile(g), with
// start(j0, jn) (a new tile of jn rows from weight row j0), load(b0, b1) (its blocks [b0, b1)) and
// panel(p, b0, b1, ct, ldc).
template <QFormat F, class G>
void run_gemm(const QMatmulArgs& a) {
  if (in_row_passes(a, [](const QMatmulArgs& p) { run_gemm<F, G>(p); })) return;
  G g(a);
  const int64_t nb = a.k / 32, mp = g.panels.padded, ntiles = (a.n + kGemmTileRows - 1) / kGemmTileRows;
  const int64_t row_bytes = kInt4<F> ? a.k / 2 : a.k, block_bytes = kInt4<F> ? 16 : 32;
#pragma omp parallel if (a.m * a.n * a.k >= kParallelMinElems)
  {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < g.panels.count; ++p) g.pack(p);
    typename G::Tile tile(g);
    std::vector<double> ct(kGemmTileRows * mp);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t j0 = t * kGemmTileRows, jn = std::min(kGemmTileRows, a.n - j0);
      tile.start(j0, jn);
      std::fill(ct.begin(), ct.end(), 0.0);
      for (int64_t b0 = 0; b0 < nb; b0 += g.chunk_blocks) {
        const int64_t b1 = std::min(nb, b0 + g.chunk_blocks);
        tile.load(b0, b1);
        if (b1 < nb) prefetch_rows(a.w, row_bytes, j0, jn, b1, std::min(nb, b1 + g.chunk_blocks), block_bytes);
        for (int64_t p = 0; p < g.panels.count; ++p) tile.panel(p, b0, b1, ct.data() + p * g.panels.big, mp);
      }
      store_tile(a, j0, jn, ct.data(), mp);
    }
  }
}

}  // namespace
}  // namespace fastllm::cpu
