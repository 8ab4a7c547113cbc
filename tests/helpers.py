"""One set of helpers for every op test: devices and backends to run, and the tolerance rule.

Tolerance rule (assert_close): fastllm's error against a float64 reference may be at most 2x the
error of torch's own op in the same dtype (RMS over the tensor; the largest single error at most
4x torch's), plus half an ulp of the values involved, so that an input where torch happens to be
exact does not demand exactness."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

import fastllm
from fastllm import _backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]

# Backends each op can run on, per device type ("cpu": the C++ kernels at the best SIMD level of this CPU,
# "cpu-avx512": capped at AVX-512 without its bfloat16 dot products, and qmatmul's float GEMM on 16-lane FMAs (float
# mode at M = 8-10 on the AVX-512 register tiles) whatever the CPU's default (cpu_zmm_float_gemm: Intel Xeons run
# those, Zen 4 the 8-lane GEMM and the AVX2 loop), "cpu-avx2": capped
# at AVX2 (ops with such paths), "cpu-scalar": with SIMD switched off).
_BACKENDS = {
    "softmax": {"cpu": ["cpu", "cpu-scalar", "triton", "torch"], "cuda": ["triton", "torch"]},
    "layer_norm": {"cpu": ["cpu", "cpu-scalar", "torch"], "cuda": ["cuda", "torch"]},
    "rms_norm": {"cpu": ["cpu", "cpu-scalar", "torch"], "cuda": ["cuda", "torch"]},
    "silu_mul": {"cpu": ["cpu", "cpu-scalar", "triton", "torch"], "cuda": ["triton", "torch"]},
    "attention": {"cpu": ["triton", "torch"], "cuda": ["triton", "torch"]},
    "attention_varlen": {"cpu": ["triton", "torch"], "cuda": ["triton", "torch"]},
    "decode_attention": {"cpu": ["cpu", "cpu-scalar", "triton", "torch"], "cuda": ["triton", "torch"]},
    "kv_cache_append": {"cpu": ["cpu", "triton", "torch"], "cuda": ["triton", "torch"]},
    "qmatmul": {"cpu": ["cpu", "cpu-avx512", "cpu-avx2", "cpu-scalar", "triton", "torch"],
                "cuda": ["cuda", "triton", "torch"]},
    "linear_cross_entropy": {"cpu": ["triton", "torch"], "cuda": ["triton", "torch"]},
}


def device_backends(op: str):
    """pytest params (device, backend) for `op`; the CUDA ones skip, saying why, without a GPU."""
    return [pytest.param(d, b, id=f"{d}-{b}", marks=[needs_cuda] if d == "cuda" else [])
            for d in ("cpu", "cuda") for b in _BACKENDS[op][d]]


@contextlib.contextmanager
def running_on(backend: str):
    """Force `backend` for the ops in this block ("cpu-scalar" / "cpu-avx2" / "cpu-avx512" also cap the SIMD
    level; "cpu-avx512" forces the 16-lane float GEMM and the AVX-512 tiles at M = 8-10 too)."""
    ext = _backend.extension()
    caps = {"cpu-scalar": 0, "cpu-avx2": 1, "cpu-avx512": 2}
    if backend in caps:
        before = ext.cpu_simd_level()  # (a cap from FASTLLM_DISABLE_* stays)
        ext.set_cpu_simd_max(caps[backend])
        zmm_before = ext.set_cpu_zmm_float_gemm(1 if backend == "cpu-avx512" else -1)
        try:
            with fastllm.use_backend("cpu"):
                yield
        finally:
            ext.set_cpu_simd_max(before)
            ext.set_cpu_zmm_float_gemm(zmm_before)
    else:
        with fastllm.use_backend(backend):
            yield


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(RMS, max) of |out - ref| over positions where ref is finite; NaN/inf positions must agree."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ"
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)]), "inf positions differ"
    if not finite.any():
        return 0.0, 0.0
    d = (out[finite] - ref[finite]).abs()
    return d.square().mean().sqrt().item(), d.max().item()


def assert_close(name: str, ours: torch.Tensor, torch_out: torch.Tensor, ref: torch.Tensor,
                 scale: float | None = None) -> None:
    """The tolerance rule. ours and torch_out are computed in the same dtype, ref in float64.

    RMS error <= 2 x torch's RMS error + atol, and max error <= 4 x torch's max error + atol, with
    atol = half an ulp of `scale` (default: the largest |ref|; gradients pass the magnitude of the
    terms they combine, since their result may be much smaller than those terms)."""
    assert ours.dtype == torch_out.dtype, (name, ours.dtype, torch_out.dtype)
    (rms_o, max_o), (rms_t, max_t) = _errors(ours, ref), _errors(torch_out, ref)
    if scale is None:
        finite = ref[torch.isfinite(ref)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
    atol = 0.5 * torch.finfo(ours.dtype).eps * max(scale, 1e-3)
    assert rms_o <= 2 * rms_t + atol, f"{name}: RMS error {rms_o:.3g} > 2 x torch's {rms_t:.3g} + {atol:.3g}"
    assert max_o <= 4 * max_t + atol, f"{name}: max error {max_o:.3g} > 4 x torch's {max_t:.3g} + {atol:.3g}"


def norm_dx_scale(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, k: int, centered: bool) -> float:
    """Magnitude of the terms a norm's dx combines, rstd * dy * w (dx itself may be far smaller)."""
    xs = x.detach().double().flatten(-k) if k > 1 else x.detach().double()
    if centered:
        xs = xs - xs.mean(-1, keepdim=True)
    rstd = xs.square().mean(-1).clamp_min(1e-30).rsqrt().max().item() if xs.numel() else 0.0
    wmax = w.detach().abs().max().item() if w is not None and w.numel() else 1.0
    dmax = dy.detach().abs().max().item() if dy.numel() else 0.0
    return rstd * wmax * dmax


def randn(shape, dtype, device, *, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def compile_check(test_file: str) -> None:
    """Run `python <test_file> compile-check` (the file's ahead-of-time compilation of its kernels for the GPU) and
    assert it succeeds. A subprocess: without TRITON_INTERPRET, which would turn the kernels into interpreted
    functions; fastllm is imported from this checkout (not from wherever the installed package points)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, test_file, "compile-check"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def compile_for_sm90(kernel, ptrs: dict, consts: dict, num_warps: int, num_stages: int, scalars: dict | None = None):
    """Shared memory (bytes) of a Triton kernel compiled ahead of time for sm_90 (H100), without a GPU. ptrs: the
    pointer arguments' types ("*bf16", ...); consts: the constexprs; scalars: types of other scalar arguments
    (default "i32"); consts the kernel does not take are ignored."""
    return compile_sm90(kernel, ptrs, consts, num_warps, num_stages, scalars).metadata.shared


def compile_sm90(kernel, ptrs: dict, consts: dict, num_warps: int, num_stages: int, scalars: dict | None = None):
    """compile_for_sm90's compiled kernel itself (metadata, asm["ptx"], asm["cubin"]; see sm90_resources)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    scalars = scalars or {}
    sig = {name: "constexpr" if name in consts else ptrs.get(name) or scalars.get(name, "i32")
           for name in inspect.signature(kernel.fn).parameters}
    consts = {k: v for k, v in consts.items() if k in sig}  # constexprs a variant shares with others
    return triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sm90_resources(compiled) -> dict:
    """{"shared": bytes, "registers": per thread, "stack": bytes per thread (register spills land there),
    "wgmma": whether Hopper's warpgroup MMA is used} of a compile_sm90 result, the register figures read from its
    cubin by Triton's own cuobjdump."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage[-500:]}")
    return {"shared": compiled.metadata.shared, "registers": int(found[1]), "stack": int(found[2]),
            "wgmma": "wgmma" in compiled.asm["ptx"]}


def free_port() -> int:
    """A free TCP port on the loopback, for a multi-process test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
