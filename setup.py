"""Build fastllm._C (pybind11; CPU always, CUDA when nvcc is found) and map kernels/ to fastllm.kernels.

The extension does not include or link torch: it takes raw pointers, sizes, strides, dtype codes and
CUDA stream handles from Python. Sources are compiled in parallel through a generated ninja file (a
thread pool when ninja is missing), then linked by the C++ compiler, or by nvcc when CUDA is built so
that the CUDA runtime is linked statically (importing the module needs no GPU and no driver).

Environment:
  FASTLLM_CUDA=0|1        0: never build CUDA; 1: require it (fail without nvcc); unset: build if nvcc is found
  FASTLLM_CUDA_ARCHS      semicolon list of compute capabilities, default "80;90"
  FASTLLM_NVCC            path of nvcc (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH)
  MAX_JOBS                parallel compile jobs (default: CPU count)
  CXX                     C++ compiler (default: c++)
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]  # only for files named *_avx2.cpp (chosen at run time)
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]  # *_avx512.cpp
AVX512BF16_FLAGS = AVX512_FLAGS + ["-mavx512bf16"]  # *_avx512bf16.cpp


def _find_nvcc():
    mode = os.environ.get("FASTLLM_CUDA", "").strip()
    if mode == "0":
        return None, "disabled by FASTLLM_CUDA=0"
    candidates = [os.environ.get("FASTLLM_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for c in candidates:
        if c and os.path.exists(c):
            return c, None
    if mode == "1":
        sys.exit("FASTLLM_CUDA=1 but nvcc was not found (set CUDA_HOME or FASTLLM_NVCC)")
    return None, "nvcc not found at build time"


def _cuda_arch_flags():
    archs = [a.strip() for a in os.environ.get("FASTLLM_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    flags += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


def _sources():
    cpp = sorted(str(p) for p in CSRC.rglob("*.cpp"))
    cu = sorted(str(p) for p in CSRC.rglob("*.cu"))
    return cpp, cu


class NinjaBuildExt(build_ext):
    """Compiles csrc/ with ninja (or a thread pool) and links one shared object."""

    def build_extension(self, ext):
        nvcc, why_no_cuda = _find_nvcc()
        cpp, cu = _sources()
        if nvcc is None:
            cu = []
        build_dir = Path(self.build_temp).resolve() / "fastllm_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        includes = [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        defines = [f"-DFASTLLM_WITH_CUDA={1 if cu else 0}"]
        if not cu:
            defines.append(f'-DFASTLLM_NO_CUDA_REASON="{why_no_cuda}"')
        cxx = os.environ.get("CXX", "c++")
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
        nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                      "--expt-relaxed-constexpr", "-lineinfo"] + _cuda_arch_flags()

        jobs = []  # (output, command)
        for src in cpp:
            obj = build_dir / (Path(src).relative_to(CSRC).as_posix().replace("/", "__") + ".o")
            extra = {"_avx2.cpp": AVX2_FLAGS, "_avx512.cpp": AVX512_FLAGS, "_avx512bf16.cpp": AVX512BF16_FLAGS}.get(
                src[src.rfind("_"):], [])
            jobs.append((str(obj), [cxx, *cxx_flags, *extra, *includes, *defines, "-MMD", "-MF", f"{obj}.d", "-c", src,
                                    "-o", str(obj)]))
        for src in cu:
            obj = build_dir / (Path(src).relative_to(CSRC).as_posix().replace("/", "__") + ".o")
            jobs.append((str(obj), [nvcc, *nvcc_flags, *includes, *defines, "-MD", "-MF", f"{obj}.d", "-c", src,
                                    "-o", str(obj)]))
        self._compile_all(jobs, build_dir)

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        objects = [o for o, _ in jobs]
        if cu:
            link = [nvcc, "-shared", "--cudart=static", *_cuda_arch_flags(), *objects, "-Xcompiler", "-fopenmp",
                    "-lgomp", "-o", str(out)]
        else:
            link = [cxx, "-shared", "-fopenmp", *objects, "-o", str(out)]
        self.announce(" ".join(shlex.quote(a) for a in link), level=2)
        subprocess.check_call(link)

    def _compile_all(self, jobs, build_dir):
        jobs_n = int(os.environ.get("MAX_JOBS", "0")) or os.cpu_count() or 1
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError:
                ninja = None
        if ninja:
            # header dependencies come from the compilers' depfiles (-MMD / -MD)
            lines = ["rule run", "  command = $cmd", "  description = $desc", "  depfile = $out.d", "  deps = gcc", ""]
            for obj, cmd in jobs:
                lines.append(f"build {obj}: run {cmd[-3]}")
                lines.append("  cmd = " + " ".join(shlex.quote(a) for a in cmd).replace("$", "$$"))
                lines.append("  desc = compile " + os.path.relpath(cmd[-3], ROOT))
            (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
            subprocess.check_call([ninja, "-C", str(build_dir), "-j", str(jobs_n)])
            return

        def run(cmd):
            print("compile", os.path.relpath(cmd[-3], ROOT), flush=True)
            subprocess.check_call(cmd)

        with ThreadPoolExecutor(jobs_n) as pool:
            list(pool.map(lambda j: run(j[1]), jobs))


setup(
    ext_modules=[Extension("fastllm._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
    package_dir={"fastllm": "fastllm", "fastllm.kernels": "kernels"},
)
