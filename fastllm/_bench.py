"""Benchmark cases shared by `fastllm bench` and benchmarks/bench_*.py: each op, forward and
backward, fastllm against torch eager and torch.compile on the same tensors, reported in GB/s of
the bytes the op must move (inputs read once, outputs written once)."""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastllm
from fastllm import _backend

# (8, 4096): a decode step's few rows, where the time is the per-call overhead (Python, dispatch, launch).
GPU_SHAPES = [(8, 4096), (4096, 4096), (16384, 8192), (8192, 32768)]
CPU_SHAPES = [(8, 4096), (1024, 1024), (4096, 4096)]
GPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_DTYPES = [torch.float32, torch.bfloat16]
OPS = ("softmax", "layer_norm", "rms_norm")
IMPLS = ("fastllm", "torch", "torch.compile")


def _torch_fn(op: str):
    return {
        "softmax": lambda x, w, b: torch.softmax(x, -1),
        "layer_norm": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
        "rms_norm": lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6),
    }[op]


def _fastllm_fn(op: str):
    return {
        "softmax": lambda x, w, b: fastllm.softmax(x, -1),
        "layer_norm": lambda x, w, b: fastllm.layer_norm(x, x.shape[-1:], w, b, 1e-5),
        "rms_norm": lambda x, w, b: fastllm.rms_norm(x, x.shape[-1:], w, 1e-6),
    }[op]


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    return torch.compile(_torch_fn(op), dynamic=False)


def implementation(op: str, impl: str) -> Callable:
    if impl == "fastllm":
        return _fastllm_fn(op)
    if impl == "torch":
        return _torch_fn(op)
    if impl == "torch.compile":
        return _compiled(op)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


@dataclass
class Case:
    op: str
    shape: tuple[int, int]
    dtype: torch.dtype
    direction: str  # "fwd" or "bwd"
    device: str

    @property
    def name(self) -> str:
        return f"{self.op}-{self.direction}-{self.shape[0]}x{self.shape[1]}-{str(self.dtype).replace('torch.', '')}"

    @property
    def bytes_moved(self) -> int:
        """fwd: read x, write y; bwd: read y or x and dy, write dx (parameters are negligible)."""
        n = self.shape[0] * self.shape[1] * torch.finfo(self.dtype).bits // 8
        return n * (2 if self.direction == "fwd" else 3)

    def make(self, impl: str) -> Callable[[], object]:
        """A no-argument callable running the case once with `impl` (tensors made here, once)."""
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(self.shape, generator=g, device=self.device, dtype=self.dtype)
        d = self.shape[1]
        w = torch.randn(d, generator=g, device=self.device, dtype=self.dtype) if self.op != "softmax" else None
        b = torch.randn(d, generator=g, device=self.device, dtype=self.dtype) if self.op == "layer_norm" else None
        fn = implementation(self.op, impl)
        if self.direction == "fwd":
            return lambda: fn(x, w, b)
        x.requires_grad_(True)
        y = fn(x, w, b)
        dy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)


def cases(device: str, ops=OPS, directions=("fwd", "bwd")) -> list[Case]:
    gpu = device.startswith("cuda")
    shapes, dtypes = (GPU_SHAPES, GPU_DTYPES) if gpu else (CPU_SHAPES, CPU_DTYPES)
    return [Case(op, s, dt, d, device) for op in ops for d in directions for s in shapes for dt in dtypes]


def synchronized(fn: Callable, device: str) -> Callable:
    """fn followed by a device synchronisation, so wall-clock timers measure the kernels."""
    if device.startswith("cuda"):
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


def warm_up(fn: Callable, *, calls: int = 3, min_time: float = 0.3, max_time: float = 3.0) -> None:
    """Run fn at least `calls` times (stopping after max_time seconds all the same) and for at least `min_time`
    seconds before timing: the first calls pay one-off costs (compilation, autotuning, and on a VM the first
    touch of memory the host has not backed yet, which hits the huge-page-backed CPU outputs hardest: on this
    project's VM a 32-64 MiB output's first 6-14 calls ran 2-4x slower than torch's, the later ones 2-3x
    faster)."""
    start, n = time.perf_counter(), 0
    while (n < calls and time.perf_counter() - start < max_time) or time.perf_counter() - start < min_time:
        fn()
        n += 1


def time_it(fn: Callable, device: str, *, min_time: float = 0.2, max_iters: int = 200,
            warm_up_time: float = 0.3, warm_up_calls: int = 3) -> float:
    """Median seconds per call (CUDA: events around each call; CPU: perf_counter), after warm_up
    (at least warm_up_calls calls and warm_up_time seconds); at least 5 calls, then up to min_time seconds or max_iters calls."""
    warm_up(fn, calls=warm_up_calls, min_time=warm_up_time)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start_all < min_time and len(samples) < max_iters):
        if device.startswith("cuda"):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def gbps(case: Case, seconds: float) -> float:
    return case.bytes_moved / seconds / 1e9


def _cpu_model() -> str | None:
    """The CPU's model name, vendor, family and model as Linux reports them (/proc/cpuinfo), None elsewhere:
    results from different CPUs (a 2-core VM may be an AMD or an Intel host from one session to the next, and
    under KVM the name alone can be as vague as "Intel(R) Xeon(R) Processor") must say which they came from."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    if "model name" not in fields:
        return None
    ids = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{fields['model name']} ({fields.get('vendor_id', '?')}, {ids})"


def environment(device: str) -> dict:
    """Device and versions recorded with every result."""
    import platform

    info = {"device": device, "torch": torch.__version__, "fastllm": fastllm.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_model"] = _cpu_model()
        info["cpu_simd"] = fastllm.backends()["cpu"].get("simd")
        ext = _backend.extension()
        if ext is not None:  # (the float qmatmul GEMM's vector width: its timings depend on it)
            info["cpu_zmm_fma_gain"] = round(ext.cpu_zmm_fma_gain(), 2)
            info["cpu_zmm_float_gemm"] = ext.cpu_zmm_float_gemm() and ext.cpu_simd_level() >= 2
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["backends"] = {k: v["available"] for k, v in fastllm.backends().items()}
    return info
