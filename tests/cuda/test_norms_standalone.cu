// Standalone GPU test + benchmark of the CUDA LayerNorm / RMSNorm kernels (no Python, no torch).
// SOURCES: csrc/cuda/layer_norm.cu csrc/cuda/rms_norm.cu csrc/cuda/norm_bwd_reduce.cu
//
// Build and run from the repository root (H100: sm_90; add -gencode for other GPUs):
//   mkdir -p build && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 \
//     -I csrc tests/cuda/test_norms_standalone.cu csrc/cuda/layer_norm.cu csrc/cuda/rms_norm.cu \
//     csrc/cuda/norm_bwd_reduce.cu -o build/test_norms_standalone && ./build/test_norms_standalone
// Options: --no-bench (correctness only), --bench-only. Out-of-bounds accesses:
//   compute-sanitizer --tool memcheck ./build/test_norms_standalone --no-bench
//
// Correctness: random inputs in fp32 / fp16 / bf16 against a float64 host reference, for row
// lengths around every launch-configuration boundary, three layouts (contiguous; padded row stride
// so 128-bit accesses are used with a partial last slot; misaligned base + odd stride so the
// element-wise path is used), absent weight/bias/statistics, dx/dw/db skipped, dextra, |mean| >>
// std. Outputs are checked against tolerances scaled to the dtype's ulp; the bytes of every
// output allocation outside the view (row padding, the misalignment offset) must stay untouched;
// add_rms_norm's s must match bit for bit. Prints max errors (in units of the tolerance) and
// PASS/FAIL; exit code 1 on any failure.
// Benchmark: (4096, 4096), (16384, 8192), (8192, 32768) in bf16 and fp32, cudaEvent timing,
// GB/s = bytes read + written once / time, next to a device-to-device cudaMemcpy of one tensor.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cuda/ops.h"
#include "standalone.cuh"

using fastllm::DType;
namespace fc = fastllm::cuda;


static const char* dname(DType t) { return fastllm::dtype_name(t); }

// A rows x cols view (row stride `stride`, `offset` elements past a 256-byte aligned allocation),
// mirrored on the host byte for byte.
struct Mat {
  DType dt;
  int64_t rows, cols, stride, offset, total;
  size_t esz;
  std::vector<unsigned char> h;
  void* d = nullptr;
  Mat(DType t, int64_t r, int64_t c, int64_t s = -1, int64_t off = 0)
      : dt(t), rows(r), cols(c), stride(s < 0 ? c : s), offset(off), esz(fastllm::dtype_size(t)) {
    total = offset + (rows > 0 ? (rows - 1) * stride + cols : 1) + 16;
    h.assign(size_t(total) * esz, 0xff);  // 0xff..: NaN in every dtype (sentinel)
    CK(cudaMalloc(&d, size_t(total) * esz));
    upload();
  }
  ~Mat() { cudaFree(d); }
  Mat(const Mat&) = delete;
  void* ptr() const { return static_cast<char*>(d) + offset * esz; }
  int64_t idx(int64_t r, int64_t c) const { return offset + r * stride + c; }
  double at(int64_t r, int64_t c) const { return fastllm::load_as_float(h.data(), idx(r, c), dt); }
  void set(int64_t r, int64_t c, float v) { fastllm::store_from_float(h.data(), idx(r, c), v, dt); }
  void upload() { CK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice)); }
  void download() { CK(cudaMemcpy(h.data(), d, h.size(), cudaMemcpyDeviceToHost)); }
  void randomize(std::mt19937_64& g, double shift, double scale) {  // the whole allocation
    std::normal_distribution<double> n(0.0, 1.0);
    for (int64_t i = 0; i < total; ++i)
      fastllm::store_from_float(h.data(), i, static_cast<float>(shift + scale * n(g)), dt);
    upload();
  }
  bool in_view(int64_t i) const {
    const int64_t j = i - offset;
    return j >= 0 && rows > 0 && j / stride < rows && j % stride < cols;
  }
  // every byte outside the view still holds the sentinel (call after download())
  int64_t stray_writes() const {
    int64_t n = 0;
    for (int64_t i = 0; i < total; ++i) {
      if (in_view(i)) continue;
      for (size_t b = 0; b < esz; ++b) n += h[size_t(i) * esz + b] != 0xff;
    }
    return n;
  }
};

// Worst |got - ref| / tol over the checked values; NaN counts as infinitely wrong.
struct Stat {
  double worst = 0, max_abs = 0;
  void add(double got, double ref, double tol) {
    const double e = std::fabs(got - ref);
    const double r = std::isnan(got) || std::isnan(e) ? INFINITY : e / tol;
    if (r > worst) worst = r;
    if (e > max_abs || std::isnan(e)) max_abs = e;
  }
};

static double ulp(DType t) { return t == DType::F32 ? 0x1p-23 : (t == DType::F16 ? 0x1p-10 : 0x1p-7); }
// tolerance of a value of dtype t: 2 ulps relative + an absolute part scaled to the tensor
static double tol_of(DType t, double ref, double scale, double loose = 1.0) {
  const double rel = t == DType::F32 ? 4e-6 : 2 * ulp(t);
  return loose * (rel * std::fabs(ref) + 4e-6 * scale + 1e-7);
}

static int g_fail = 0;
static std::map<std::string, double> g_worst;  // op/dtype -> worst ratio

static void report(const std::string& op, DType t, const std::string& what, const Stat& s, int64_t stray,
                   const std::string& cs) {
  const bool ok = s.worst <= 1.0 && stray == 0;
  std::string key = op + " " + dname(t) + " " + what;
  g_worst[key] = std::max(g_worst[key], s.worst);
  if (!ok) {
    ++g_fail;
    std::printf("FAIL %-18s %-8s %-5s %s: max err %.3g (%.3g x tol), stray bytes %lld\n", op.c_str(), dname(t),
                what.c_str(), cs.c_str(), s.max_abs, s.worst, static_cast<long long>(stray));
  }
}

struct Case {
  int64_t rows, cols;
};

// layout 0: contiguous; 1: padded stride (multiple of 8, vector path, partial last slot);
// 2: misaligned base and odd stride (element path)
static void layout(int l, int64_t cols, int64_t& stride, int64_t& off) {
  stride = l == 0 ? cols : (l == 1 ? (cols + 7) / 8 * 8 + 8 : cols + 3);
  off = l == 2 ? 1 : 0;
}

static void test_case(DType t, Case c, int l, int variant, std::mt19937_64& g) {
  const int64_t R = c.rows, C = c.cols;
  int64_t st, off;
  layout(l, C, st, off);
  const bool large_mean = variant == 6 && t == DType::F32;  // with w, b, stats, dx, dw
  const double loose = large_mean ? 50.0 : 1.0;
  char buf[160];
  std::snprintf(buf, sizeof buf, "rows=%lld cols=%lld layout=%d variant=%d%s", (long long)R, (long long)C, l, variant,
                large_mean ? " (|mean|>>std)" : "");
  const std::string cs = buf;
  const bool has_w = variant % 3 != 2, has_b = variant % 3 == 0, has_stats = variant % 4 != 3;
  const float eps = 1e-5f;

  Mat x(t, R, C, st, off), r(t, R, C, st + (l == 0 ? 0 : 8), off), dy(t, R, C, st, off), de(t, R, C, st, off);
  x.randomize(g, large_mean ? 1000.0 : 0.5, large_mean ? 1.0 : 2.0);
  r.randomize(g, 0.0, 1.0);
  dy.randomize(g, 0.0, 1.0);
  de.randomize(g, 0.0, 1.0);
  Mat w(t, 1, C, C, l == 2 ? 1 : 0), b(t, 1, C, C, l == 2 ? 1 : 0);
  w.randomize(g, 1.0, 0.5);
  b.randomize(g, 0.0, 0.5);
  const void* wp = has_w ? w.ptr() : nullptr;
  const void* bp = has_b ? b.ptr() : nullptr;
  auto wv = [&](int64_t j) { return has_w ? w.at(0, j) : 1.0; };
  auto bv = [&](int64_t j) { return has_b ? b.at(0, j) : 0.0; };

  // ---- reference statistics ----
  std::vector<double> mean(R), rstd(R), rrms(R);
  std::vector<float> meanf(R), rstdf(R), rrmsf(R);
  for (int64_t i = 0; i < R; ++i) {
    double s = 0, q = 0;
    for (int64_t j = 0; j < C; ++j) s += x.at(i, j), q += x.at(i, j) * x.at(i, j);
    mean[i] = s / C;
    double v = 0;
    for (int64_t j = 0; j < C; ++j) v += (x.at(i, j) - mean[i]) * (x.at(i, j) - mean[i]);
    rstd[i] = 1.0 / std::sqrt(v / C + eps);
    rrms[i] = 1.0 / std::sqrt(q / C + eps);
    meanf[i] = float(mean[i]), rstdf[i] = float(rstd[i]), rrmsf[i] = float(rrms[i]);
  }

  // ---- layer_norm_fwd ----
  {
    Mat y(t, R, C, st + (l == 1 ? 8 : 0), off), m(DType::F32, 1, R), rs(DType::F32, 1, R);
    fc::layer_norm_fwd(x.ptr(), x.stride, wp, bp, y.ptr(), y.stride, has_stats ? (float*)m.ptr() : nullptr,
                       has_stats ? (float*)rs.ptr() : nullptr, R, C, eps, t, 0);
    CK(cudaDeviceSynchronize());
    y.download(), m.download(), rs.download();
    Stat sy, sm;
    double scale = 0;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) scale = std::max(scale, std::fabs((x.at(i, j) - mean[i]) * rstd[i] * wv(j) + bv(j)));
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const double ref = (x.at(i, j) - mean[i]) * rstd[i] * wv(j) + bv(j);
        sy.add(y.at(i, j), ref, tol_of(t, ref, scale, loose));
      }
      if (has_stats) {
        sm.add(m.at(0, i), mean[i], 1e-6 * (std::fabs(mean[i]) + 1.0 / rstd[i]) * loose + 1e-7);
        sm.add(rs.at(0, i), rstd[i], 1e-5 * rstd[i] * loose);
      }
    }
    report("layer_norm_fwd", t, "y", sy, y.stray_writes(), cs);
    report("layer_norm_fwd", t, "stats", sm, has_stats ? m.stray_writes() + rs.stray_writes() : 0, cs);
  }
  // ---- rms_norm_fwd ----
  {
    Mat y(t, R, C, st, off), rs(DType::F32, 1, R);
    fc::rms_norm_fwd(x.ptr(), x.stride, wp, y.ptr(), y.stride, has_stats ? (float*)rs.ptr() : nullptr, R, C, eps, t, 0);
    CK(cudaDeviceSynchronize());
    y.download(), rs.download();
    Stat sy, sm;
    double scale = 0;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) scale = std::max(scale, std::fabs(x.at(i, j) * rrms[i] * wv(j)));
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const double ref = x.at(i, j) * rrms[i] * wv(j);
        sy.add(y.at(i, j), ref, tol_of(t, ref, scale));
      }
      if (has_stats) sm.add(rs.at(0, i), rrms[i], 1e-5 * rrms[i]);
    }
    report("rms_norm_fwd", t, "y", sy, y.stray_writes(), cs);
    report("rms_norm_fwd", t, "rstd", sm, has_stats ? rs.stray_writes() : 0, cs);
  }
  // ---- add_rms_norm_fwd ----
  {
    Mat s(t, R, C, st, off), y(t, R, C, st + (l == 1 ? 8 : 0), off), rs(DType::F32, 1, R);
    fc::add_rms_norm_fwd(x.ptr(), x.stride, r.ptr(), r.stride, s.ptr(), s.stride, wp, y.ptr(), y.stride,
                         has_stats ? (float*)rs.ptr() : nullptr, R, C, eps, t, 0);
    CK(cudaDeviceSynchronize());
    s.download(), y.download(), rs.download();
    Mat sref(t, R, C);  // host only use
    Stat ss, sy, sm;
    double scale = 0;
    std::vector<double> rr(R);
    for (int64_t i = 0; i < R; ++i) {
      double q = 0;
      for (int64_t j = 0; j < C; ++j) {
        sref.set(i, j, static_cast<float>(x.at(i, j)) + static_cast<float>(r.at(i, j)));  // fp32 add, then RNE
        q += sref.at(i, j) * sref.at(i, j);
        ss.add(s.at(i, j), sref.at(i, j), 1e-300);  // bit exact (0/0 excluded: equal values give 0)
      }
      rr[i] = 1.0 / std::sqrt(q / C + eps);
      for (int64_t j = 0; j < C; ++j) scale = std::max(scale, std::fabs(sref.at(i, j) * rr[i] * wv(j)));
    }
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const double ref = sref.at(i, j) * rr[i] * wv(j);
        sy.add(y.at(i, j), ref, tol_of(t, ref, scale));
      }
      if (has_stats) sm.add(rs.at(0, i), rr[i], 1e-5 * rr[i]);
    }
    report("add_rms_norm_fwd", t, "s", ss, s.stray_writes(), cs);
    report("add_rms_norm_fwd", t, "y", sy, y.stray_writes(), cs);
    report("add_rms_norm_fwd", t, "rstd", sm, has_stats ? rs.stray_writes() : 0, cs);
  }
  // ---- layer_norm_bwd / rms_norm_bwd (statistics: the fp32-rounded reference ones) ----
  for (int ln = 1; ln >= 0; --ln) {
    const bool need_dx = variant % 5 != 4, need_dw = has_w && variant % 5 != 3, need_db = ln && has_b;
    const bool use_de = !ln && variant % 2 == 0;
    Mat m(DType::F32, 1, R), rs(DType::F32, 1, R), dx(t, R, C, st, off);
    Mat dw(DType::F32, 1, C), db(DType::F32, 1, C);
    for (int64_t i = 0; i < R; ++i) m.set(0, i, meanf[i]), rs.set(0, i, ln ? rstdf[i] : rrmsf[i]);
    m.upload(), rs.upload();
    const int64_t nws = fc::norm_bwd_workspace_floats(R, C);
    Mat ws(DType::F32, 1, std::max<int64_t>(nws, 1));
    if (ln)
      fc::layer_norm_bwd(dy.ptr(), dy.stride, x.ptr(), x.stride, wp, (float*)m.ptr(), (float*)rs.ptr(),
                         need_dx ? dx.ptr() : nullptr, dx.stride, need_dw ? (float*)dw.ptr() : nullptr,
                         need_db ? (float*)db.ptr() : nullptr, (float*)ws.ptr(), R, C, t, 0);
    else
      fc::rms_norm_bwd(dy.ptr(), dy.stride, x.ptr(), x.stride, wp, (float*)rs.ptr(), use_de ? de.ptr() : nullptr,
                       de.stride, need_dx ? dx.ptr() : nullptr, dx.stride, need_dw ? (float*)dw.ptr() : nullptr,
                       (float*)ws.ptr(), R, C, t, 0);
    CK(cudaDeviceSynchronize());
    dx.download(), dw.download(), db.download();
    std::vector<double> rdx(size_t(R) * C), rdw(C, 0), rdb(C, 0), adw(C, 0), adb(C, 0);
    double scale = 0;
    for (int64_t i = 0; i < R; ++i) {
      const double mu = ln ? double(meanf[i]) : 0.0, rsd = ln ? double(rstdf[i]) : double(rrmsf[i]);
      double s1 = 0, s2 = 0;
      for (int64_t j = 0; j < C; ++j) {
        const double xh = (x.at(i, j) - mu) * rsd, gv = dy.at(i, j) * wv(j);
        s1 += gv, s2 += gv * xh;
        rdw[j] += dy.at(i, j) * xh, adw[j] += std::fabs(dy.at(i, j) * xh);
        rdb[j] += dy.at(i, j), adb[j] += std::fabs(dy.at(i, j));
      }
      for (int64_t j = 0; j < C; ++j) {
        const double xh = (x.at(i, j) - mu) * rsd, gv = dy.at(i, j) * wv(j);
        double v = rsd * (gv - (ln ? s1 / C : 0.0) - xh * s2 / C);
        if (use_de) v += de.at(i, j);
        rdx[size_t(i) * C + j] = v;
        scale = std::max(scale, std::fabs(v));
      }
    }
    const std::string op = ln ? "layer_norm_bwd" : "rms_norm_bwd";
    Stat sx, sw, sb;
    if (need_dx)
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j < C; ++j) {
          const double ref = rdx[size_t(i) * C + j];
          sx.add(dx.at(i, j), ref, tol_of(t, ref, scale, loose));
        }
    for (int64_t j = 0; j < C; ++j) {
      if (need_dw) sw.add(dw.at(0, j), rdw[j], (2e-5 * adw[j] + 1e-6) * loose);
      if (need_db) sb.add(db.at(0, j), rdb[j], 2e-5 * adb[j] + 1e-6);
    }
    report(op, t, "dx", sx, dx.stray_writes(), cs);
    if (!need_dx) {  // nothing may have been written
      int64_t n = 0;
      for (unsigned char v : dx.h) n += v != 0xff;
      report(op, t, "dx=0", Stat{}, n, cs);
    }
    report(op, t, "dw", sw, need_dw ? dw.stray_writes() : 0, cs);
    if (ln) report(op, t, "db", sb, need_db ? db.stray_writes() : 0, cs);
  }
}

// ------------------------------------------- benchmark -------------------------------------------
__global__ void fill_kernel(unsigned char* p, size_t n, int esz, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
    const float v = (float(h & 0xffffu) / 65536.f - 0.5f) * 4.f;
    if (esz == 4) reinterpret_cast<float*>(p)[i] = v;
    else { unsigned u = __float_as_uint(v); reinterpret_cast<unsigned short*>(p)[i] = (unsigned short)(u >> 16); }
  }
}

static void* dev_fill(size_t n, int esz, unsigned seed) {
  void* p;
  CK(cudaMalloc(&p, n * esz));
  fill_kernel<<<1024, 256>>>(static_cast<unsigned char*>(p), n, esz, seed);
  CK(cudaGetLastError());
  return p;
}


static void bench() {
  const Case shapes[] = {{4096, 4096}, {16384, 8192}, {8192, 32768}};
  const DType types[] = {DType::BF16, DType::F32};
  std::printf("\n%-18s %-9s %-13s %10s %10s %8s\n", "op", "dtype", "rows x cols", "time(us)", "GB/s", "%copy");
  for (DType t : types)
    for (Case c : shapes) {
      const int64_t R = c.rows, C = c.cols, N = R * C;
      const int esz = int(fastllm::dtype_size(t));
      const double tb = double(N) * esz;  // bytes of one tensor
      void *x = dev_fill(N, esz, 1), *r = dev_fill(N, esz, 2), *dy = dev_fill(N, esz, 3), *y = dev_fill(N, esz, 4);
      void *s = dev_fill(N, esz, 5), *w = dev_fill(C, esz, 6), *b = dev_fill(C, esz, 7);
      float *mean, *rstd, *dw, *db, *ws;
      CK(cudaMalloc(&mean, R * 4));
      CK(cudaMalloc(&rstd, R * 4));
      CK(cudaMalloc(&dw, C * 4));
      CK(cudaMalloc(&db, C * 4));
      CK(cudaMalloc(&ws, std::max<int64_t>(fc::norm_bwd_workspace_floats(R, C), 1) * 4));
      const int iters = N * esz > (int64_t(1) << 29) ? 10 : 50;
      const double copy = time_ms([&] { CK(cudaMemcpyAsync(y, x, size_t(tb), cudaMemcpyDeviceToDevice)); }, iters);
      const double copy_gbs = 2 * tb / copy / 1e6;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", (long long)R, (long long)C);
      auto row = [&](const char* op, double ms, double bytes) {
        const double gbs = bytes / ms / 1e6;
        std::printf("%-18s %-9s %-13s %10.1f %10.0f %7.0f%%\n", op, dname(t), shape, ms * 1e3, gbs, 100 * gbs / copy_gbs);
      };
      row("memcpy d2d", copy, 2 * tb);
      row("layer_norm_fwd", time_ms([&] { fc::layer_norm_fwd(x, C, w, b, y, C, mean, rstd, R, C, 1e-5f, t, 0); }, iters),
          2 * tb);
      row("rms_norm_fwd", time_ms([&] { fc::rms_norm_fwd(x, C, w, y, C, rstd, R, C, 1e-5f, t, 0); }, iters), 2 * tb);
      row("add_rms_norm_fwd",
          time_ms([&] { fc::add_rms_norm_fwd(x, C, r, C, s, C, w, y, C, rstd, R, C, 1e-5f, t, 0); }, iters), 4 * tb);
      fc::layer_norm_fwd(x, C, w, b, y, C, mean, rstd, R, C, 1e-5f, t, 0);  // sane statistics
      row("layer_norm_bwd",
          time_ms([&] { fc::layer_norm_bwd(dy, C, x, C, w, mean, rstd, s, C, dw, db, ws, R, C, t, 0); }, iters), 3 * tb);
      row("rms_norm_bwd",
          time_ms([&] { fc::rms_norm_bwd(dy, C, x, C, w, rstd, nullptr, 0, s, C, dw, ws, R, C, t, 0); }, iters), 3 * tb);
      CK(cudaDeviceSynchronize());
      for (void* p : {x, r, dy, y, s, w, b}) CK(cudaFree(p));
      for (float* p : {mean, rstd, dw, db, ws}) CK(cudaFree(p));
    }
  std::printf("(bwd bytes: x, dy read + dx written; the dw/db partial sums are extra traffic)\n");
}

int main(int argc, char** argv) {
  bool do_test = true, do_bench = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-bench")) do_bench = false;
    if (!std::strcmp(argv[i], "--bench-only")) do_test = false;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  if (do_test) {
    // rows == 0: no launch, no error, nothing touched
    fc::layer_norm_fwd(nullptr, 0, nullptr, nullptr, nullptr, 0, nullptr, nullptr, 0, 8, 1e-5f, DType::F32, 0);
    fc::layer_norm_bwd(nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr, 0, 8,
                       DType::F32, 0);
    fc::rms_norm_fwd(nullptr, 0, nullptr, nullptr, 0, nullptr, 0, 8, 1e-5f, DType::BF16, 0);
    fc::add_rms_norm_fwd(nullptr, 0, nullptr, 0, nullptr, 0, nullptr, nullptr, 0, nullptr, 0, 8, 1e-5f, DType::F16, 0);
    fc::rms_norm_bwd(nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, 0, nullptr, 0, nullptr, nullptr, 0, 8,
                     DType::F32, 0);
    CK(cudaDeviceSynchronize());
    // row lengths around every configuration boundary (fwd: 32*V, 1024, 16384, shared-memory
    // capacity; bwd: 256, 8192, 32768 per chunk), and many rows for the dw/db partial sums
    const Case cases[] = {{1, 1},     {4, 3},      {37, 16},     {7, 127},    {5, 128},    {33, 256},
                          {19, 257},  {3000, 64},  {1000, 96},   {64, 1000},  {9, 1024},   {4, 1025},
                          {513, 2048}, {3, 4097},  {300, 5000},  {2, 8192},   {3, 8193},   {129, 12288},
                          {2, 16384}, {2, 16385},  {2, 32768},   {3, 32769},  {1, 70000},  {1, 120000},
                          {1, 262144},
                          // more rows than the grid has blocks: each block's loop over its rows, and the dw/db
                          // partial sums across them (warp-group, one-row-per-block and chunked backward kernels)
                          {20000, 64}, {5000, 1024}, {2000, 12288}};
    std::mt19937_64 g(1234);
    const DType types[] = {DType::F32, DType::F16, DType::BF16};
    int variant = 0;
    for (DType t : types)
      for (const Case& c : cases)
        for (int l = 0; l < 3; ++l) test_case(t, c, l, variant++ % 8, g);
    std::printf("%-40s %s\n", "check", "worst error / tolerance");
    for (auto& kv : g_worst) std::printf("%-40s %.3f\n", kv.first.c_str(), kv.second);
    std::printf("%s: %d failed checks\n", g_fail ? "FAIL" : "PASS", g_fail);
  }
  if (do_bench) bench();
  return g_fail ? 1 : 0;
}
