"""Loading of the compiled extension and of the Triton kernels, and what each backend can do.

Backends, fastest first where they apply:
  "cuda"   - fastllm._C built with nvcc, for CUDA tensors
  "triton" - fastllm.kernels (Triton), for CUDA tensors; on CPU only under TRITON_INTERPRET=1 and
             only when asked for with fastllm.use_backend("triton") (the interpreter is for tests)
  "cpu"    - fastllm._C's C++ kernels (AVX2/FMA chosen at run time, OpenMP), for CPU tensors
  "torch"  - the pure-torch references in fastllm.reference, always available

If the extension is missing or fails to load, `import fastllm` still works: it warns once and the
torch reference serves instead. FASTLLM_STRICT=1 turns that into an ImportError (CI runs strict).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""Element-type codes understood by fastllm._C (csrc/common/dtype.h)."""

KERNEL_DTYPES = tuple(DTYPE_CODES)


def _strict() -> bool:
    return os.environ.get("FASTLLM_STRICT", "0") not in ("", "0")


def _load_extension():
    try:
        return importlib.import_module("fastllm._C"), None
    except Exception as exc:  # ImportError, or an OSError from a broken shared object
        reason = f"fastllm._C failed to load: {type(exc).__name__}: {exc}"
        if _strict():
            raise ImportError(f"{reason} (FASTLLM_STRICT=1 forbids the pure-torch fallback)") from exc
        warnings.warn(f"{reason}; falling back to the pure-torch reference path", RuntimeWarning, stacklevel=3)
        return None, reason


_C, _C_ERROR = _load_extension()


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[object | None, str]:
    """(fastllm.kernels package or None, reason when missing). Imported lazily: triton is slow to import."""
    try:
        importlib.import_module("triton")
        return importlib.import_module("fastllm.kernels"), ""
    except Exception as exc:
        if _strict() and not isinstance(exc, ModuleNotFoundError):
            raise
        return None, f"triton unavailable: {type(exc).__name__}: {exc}"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def extension():
    """The loaded fastllm._C module, or None."""
    return _C


def why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device` in this process, else the reason it cannot."""
    return why_not_on(backend, device.type)


def why_not_on(backend: str, device_type: str) -> str | None:
    """why_not for a device type ("cpu", "cuda", ...): what the dispatcher asks on every call."""
    if backend == "cpu":
        if device_type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {device_type}"
        return None if _C is not None else _C_ERROR
    if backend == "torch":
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernels take CUDA tensors, not {device_type}"
        if _C is None:
            return _C_ERROR
        if not _C.has_cuda:
            return f"fastllm._C was built without CUDA ({_C.no_cuda_reason})"
        return None
    if backend == "triton":
        if device_type == "cpu":
            if not triton_interpreting():
                return "Triton runs on CPU only under TRITON_INTERPRET=1"
        elif device_type != "cuda":
            return f"Triton kernels take CUDA tensors, not {device_type}"
        mod, reason = _triton_status()
        return None if mod is not None else reason
    raise ValueError(f"unknown backend {backend!r}")


def backends() -> dict:
    """What each backend offers in this process and, for each unavailable one, why.

    Returns {name: {"available": bool, "reason": str, ...}} for "cuda", "triton", "cpu" and "torch".
    """
    cuda_dev = torch.device("cuda")
    gpu = torch.cuda.is_available()
    out = {}
    reason = why_not("cuda", cuda_dev)
    if reason is None and not gpu:
        reason = "built with CUDA, but no CUDA device is visible"
    out["cuda"] = {"available": reason is None, "reason": reason or ""}
    reason = why_not("triton", cuda_dev)
    if reason is None and not gpu:
        reason = "triton installed, but no CUDA device is visible" + (
            " (TRITON_INTERPRET=1: usable on CPU when forced)" if triton_interpreting() else "")
    out["triton"] = {"available": reason is None, "reason": reason or ""}
    reason = why_not("cpu", torch.device("cpu"))
    cpu = {"available": reason is None, "reason": reason or ""}
    if _C is not None:
        cpu["simd"] = ("scalar", "avx2+fma", "avx512+vnni", "avx512+vnni+bf16")[_C.cpu_simd_level()]
    out["cpu"] = cpu
    out["torch"] = {"available": True, "reason": "", "version": torch.__version__}
    return out
