// Weight-only quantised GEMV on CUDA for few rows of x (cuda/ops.h qmatmul_gemv):
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],  m < M <= kQGemvMaxRows,
// W packed in the "rows" layout of fastllm/quant/formats.py (common/qformat.h), x/y/bias in
// fp32/fp16/bf16, fp32 accumulation. Memory-bound: every packed weight byte is read once.
//
// Work split. K is cut into chunks of 32 elements (kChunk): one int4 block (16 bytes) or 32 int8
// bytes, always inside one quantisation group (groups are multiples of 32). A block of kWarps
// warps owns kWarps * kRowsPerWarp consecutive output channels n, kRowsPerWarp per warp. The
// block walks K in tiles of kTileChunks chunks: it stages x[:, tile] in shared memory as fp32,
// then lane l of every warp takes chunk l of the tile for each of its warp's channels: one or two
// 128-bit loads of packed weights per channel (requested before x is staged, so they overlap), dequantisation in
// registers, and MT dot products of 32 with the staged x. At the end a warp-shuffle sum over the
// 32 lanes gives each (m, n) and lane 0 writes it (+ bias, rounded to the output dtype).
//
// Dequantisation is exact (formats.py): the integer value v of an element becomes a float by the
// magic-number trick (the bits 0x4B000000 | b are the float 2^23 + b for 0 <= b < 2^23), then
// w = fmaf(v, d, off) with (int8) off = 0, (int4) off = -8 d, (int4_asym) off = m; v * d is exact
// in fp32 (<= 18 significant bits), so each w is the reference's value rounded once.
//
// Shared memory: x[m] of a tile is kTileChunks rows of kChunkPad floats (32 values + 4 padding):
// lane l reads its chunk as float4 at word 36 l + 4 q, so the 8 lanes of each quarter-warp
// phase hit banks 4 l + 4 q (mod 32), all distinct: conflict-free.
#include "common.cuh"
#include "ops.h"

namespace fastllm::cuda {
namespace {

constexpr int kChunk = 32;                    // K elements per chunk (one int4 block)
constexpr int kChunkPad = kChunk + 4;         // floats per staged chunk (bank-conflict padding)
constexpr int kWarps = 4;                     // warps per block
constexpr int kRowsPerWarp = 4;               // output channels per warp: their loads overlap
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kTileChunks = 32;               // chunks per K tile: one per lane
constexpr int kTileK = kTileChunks * kChunk;  // K elements per tile (1024)

struct GemvArgs {
  const void* x;
  int64_t xs;  // row stride of x in elements
  const unsigned char* w;
  const void* scales;    // f32 (n, 1) for I8Channel, else f16 (n, k / group)
  const __half* mins;    // f16 (n, k / group) for I4Asym, else nullptr
  const void* bias;      // (n,) of x's dtype or nullptr
  void* y;
  int64_t ys;            // row stride of y in elements
  int64_t m, n, k;
  int64_t group_chunks;  // group / kChunk
  int64_t groups;        // k / group: scales (and mins) per row
};

// Packed chunk of format F: kWords 32-bit words, loaded as kWords / 4 uint4.
template <QFormat F>
struct Packed {
  static constexpr bool kInt4 = F == QFormat::I4 || F == QFormat::I4Asym;
  static constexpr int kWords = kInt4 ? 4 : 8;
  static constexpr int64_t kChunkBytes = kWords * 4;

  // Bytes of one packed row of k elements.
  __device__ __forceinline__ static int64_t row_bytes(int64_t k) { return kInt4 ? k / 2 : k; }

  // Integer value of element i = 4 q + e (q < 8, e < 4) of the chunk, as an exact float.
  //   int4: element i < 16 is the low nibble of byte i, element 16 + i the high nibble of byte i;
  //         byte j is bits 8 (j % 4) .. of word j / 4. So element 4 q + e is in word q % 4 at bit
  //         8 e + 4 (q / 4).  v = u in [0, 15] (the offset -8 of int4 is in `off`).
  //   int8: element 4 q + e is byte e of word q, two's complement; b ^ 0x80 = q + 128 in [0, 255].
  __device__ __forceinline__ static float value(const uint32_t (&w)[kWords], int q, int e) {
    if constexpr (kInt4) {
      const uint32_t u = (w[q & 3] >> (8 * e + 4 * (q >> 2))) & 0xFu;
      return __uint_as_float(0x4B000000u | u) - 8388608.0f;
    } else {
      const uint32_t b = ((w[q] >> (8 * e)) & 0xFFu) ^ 0x80u;
      return __uint_as_float(0x4B000000u | b) - 8388736.0f;  // 2^23 + 128
    }
  }

  // Scale d and offset of group g of row n: W = fmaf(value, d, off).
  __device__ __forceinline__ static void scale(const GemvArgs& a, int64_t n, int64_t g, float& d, float& off) {
    if constexpr (F == QFormat::I8Channel) {
      d = __ldg(static_cast<const float*>(a.scales) + n);
      off = 0.0f;
    } else {
      d = __half2float(__ldg(static_cast<const __half*>(a.scales) + n * a.groups + g));
      if constexpr (F == QFormat::I8Group) off = 0.0f;
      else if constexpr (F == QFormat::I4) off = -8.0f * d;
      else off = __half2float(__ldg(a.mins + n * a.groups + g));
    }
  }
};

// MT: rows of x handled (the first a.m of them are real, the rest are staged as zeros).
template <typename T, QFormat F, int MT>
__global__ void __launch_bounds__(kWarps * 32) qgemv_kernel(GemvArgs a) {
  using PK = Packed<F>;
  __shared__ __align__(16) float xs[MT][kTileChunks * kChunkPad];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = int64_t(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;
  const int64_t chunks = a.k / kChunk;
  const T* x = static_cast<const T*>(a.x);
  float acc[kRowsPerWarp * MT];  // acc[r * MT + m]
#pragma unroll
  for (int i = 0; i < kRowsPerWarp * MT; ++i) acc[i] = 0.0f;

  for (int64_t c0 = 0; c0 < chunks; c0 += kTileChunks) {
    // This lane's chunk c: its packed weights for the warp's channels are requested first, so the
    // loads are in flight while the block stages x.
    const int64_t c = c0 + lane;
    const bool active = c < chunks;
    uint32_t w[kRowsPerWarp][PK::kWords];
    float d[kRowsPerWarp], off[kRowsPerWarp];
    if (active) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {  // channels past n re-read the last one (never stored)
        const int64_t n = min(n0 + r, a.n - 1);
        const uint4* p = reinterpret_cast<const uint4*>(a.w + n * PK::row_bytes(a.k) + c * PK::kChunkBytes);
#pragma unroll
        for (int v = 0; v < PK::kWords / 4; ++v) {
          const uint4 u = __ldg(p + v);
          w[r][4 * v] = u.x;
          w[r][4 * v + 1] = u.y;
          w[r][4 * v + 2] = u.z;
          w[r][4 * v + 3] = u.w;
        }
        PK::scale(a, n, c / a.group_chunks, d[r], off[r]);
      }
    }
    __syncthreads();  // every warp is done reading the previous tile of x
    for (int i = threadIdx.x; i < MT * kTileK; i += blockDim.x) {
      const int m = i / kTileK, col = i % kTileK;
      const int64_t kk = c0 * kChunk + col;
      xs[m][(col / kChunk) * kChunkPad + col % kChunk] = m < a.m && kk < a.k ? to_float(x[m * a.xs + kk]) : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
    const float* xl = &xs[0][lane * kChunkPad];
#pragma unroll
    for (int q = 0; q < kChunk / 4; ++q) {
      float4 xq[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) xq[m] = *reinterpret_cast<const float4*>(xl + m * kTileChunks * kChunkPad + 4 * q);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float wv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) wv[e] = fmaf(PK::value(w[r], q, e), d[r], off[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          float& s = acc[r * MT + m];
          s = fmaf(wv[0], xq[m].x, s);
          s = fmaf(wv[1], xq[m].y, s);
          s = fmaf(wv[2], xq[m].z, s);
          s = fmaf(wv[3], xq[m].w, s);
        }
      }
    }
  }

  warp_sum<32>(acc);
  if (lane != 0) return;
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n0 + r;
    if (n >= a.n) break;
    const float b = bias ? to_float(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < a.m) y[m * a.ys + n] = from_float<T>(acc[r * MT + m] + b);
  }
}

// Launch settings, in one place: kWarps * 32 threads, one block per kRowsPerBlock channels, MT =
// the next power of two >= m (staged zero rows cost arithmetic only, no memory traffic).
template <typename T, QFormat F>
void launch_qgemv(const GemvArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kRowsPerBlock))), block(kWarps * 32);
  const auto go = [&](auto kernel) { launch_kernel("qmatmul_gemv", kernel, grid, block, 0, stream, a); };
  if (a.m == 1) go(qgemv_kernel<T, F, 1>);
  else if (a.m == 2) go(qgemv_kernel<T, F, 2>);
  else if (a.m <= 4) go(qgemv_kernel<T, F, 4>);
  else go(qgemv_kernel<T, F, 8>);
}

template <typename T>
void launch_qgemv_fmt(const GemvArgs& a, QFormat fmt, cudaStream_t stream) {
  switch (fmt) {
    case QFormat::I8Channel: return launch_qgemv<T, QFormat::I8Channel>(a, stream);
    case QFormat::I8Group: return launch_qgemv<T, QFormat::I8Group>(a, stream);
    case QFormat::I4: return launch_qgemv<T, QFormat::I4>(a, stream);
    case QFormat::I4Asym: return launch_qgemv<T, QFormat::I4Asym>(a, stream);
  }
}

}  // namespace

void qmatmul_gemv(const void* x, int64_t x_stride, const void* w, const void* scales, const void* mins,
                  const void* bias, void* y, int64_t y_stride, int64_t m, int64_t n, int64_t k, int64_t group,
                  QFormat fmt, DType dt, uintptr_t stream) {
  if (m == 0) return;
  const GemvArgs a{x, x_stride, static_cast<const unsigned char*>(w), scales, static_cast<const __half*>(mins),
                   bias, y, y_stride, m, n, k, group / kChunk, k / group};
  const cudaStream_t s = as_stream(stream);
  switch (dt) {
    case DType::F32: return launch_qgemv_fmt<float>(a, fmt, s);
    case DType::F16: return launch_qgemv_fmt<__half>(a, fmt, s);
    case DType::BF16: return launch_qgemv_fmt<__nv_bfloat16>(a, fmt, s);
  }
}

}  // namespace fastllm::cuda
