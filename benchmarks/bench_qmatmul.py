"""fastllm.qmatmul (weight-only int8 / int4) against torch's peers on the same shapes, in the same test
(harness.compare): up to M = 8 in GB/s of weight bytes (the packed weight and its scales, read once per
call; suite "qmatmul"), above it in TFLOP/s of 2 M N K (suite "qmatmul-gemm"); a peer's rate is the same
work over its own time, so rate ratios are time ratios.

CPU (fastllm with float32 activations): fp32 F.linear, torch._weight_int8pack_mm (int8 per-channel)
and torch._weight_int4pack_mm_for_cpu (int4, group 128), these two with bfloat16 activations (their
fast path); M in {1, 8} (decode; the issue's cases) and {16, 128} (prefill: fastllm's GEMMs), (K, N) in
{(4096, 4096), (4096, 11008)}. GPU (bfloat16): bf16 F.linear, torch._weight_int8pack_mm, torch._weight_int4pack_mm;
M in {1, 8, 16, 128}, (K, N) in {(4096, 4096), (4096, 14336), (8192, 28672)}. On the GPU fastllm's
act="float" figure is the dispatcher's choice: the CUDA GEMV (csrc/cuda/qmatmul_gemv.cu) for M <= 8, the
Triton GEMM with dequantisation in the K loop (kernels/qmatmul.py) for M = 16 and 128; act="int8" still
runs the dequantise-then-matmul reference there.
fastllm variants: int8 (per-channel) and int4 (symmetric, group 128), each with float activations
(act="float", exact weights) and int8 activations (act="int8", integer dot products); on the CPU also
"int4-bf16", float mode with bfloat16 activations as the torch peers get them; on the GPU also
"int8-triton" / "int4-triton", the Triton GEMM forced at every M (at M <= 8 against the GEMV's figure).
On a CPU with AVX-512 VNNI fastllm runs its AVX-512 path; FASTLLM_DISABLE_AVX512=1 times the AVX2 one
instead. With --benchmark-disable (CI) only the tiny case runs, once.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

import fastllm
from harness import DEVICE, compare

GPU = DEVICE == "cuda"
SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)] if GPU else [(4096, 4096), (4096, 11008)]  # (K, N)
MS = [1, 8, 16, 128]
TINY = (1, 256, 256)  # (M, K, N): the case CI runs
GEMV_MAX_M = 8  # up to this M the cases report GB/s of weights (suite "qmatmul"), above it TFLOP/s ("qmatmul-gemm")
DTYPE = torch.bfloat16 if GPU else torch.float32
INT4_GROUP = 128
VARIANTS = {"int8": ("int8", None, "float", None, DTYPE), "int8-act8": ("int8", None, "int8", None, DTYPE),
            "int4": ("int4", INT4_GROUP, "float", None, DTYPE), "int4-act8": ("int4", INT4_GROUP, "int8", None, DTYPE)}
"""name: (scheme, group size, act, forced backend or None for the dispatcher's choice, x's dtype)."""
if GPU:
    VARIANTS.update({"int8-triton": ("int8", None, "float", "triton", DTYPE),
                     "int4-triton": ("int4", INT4_GROUP, "float", "triton", DTYPE)})
else:  # the peers' activation dtype (AVX512_BF16 CPUs: bfloat16 dot products)
    VARIANTS["int4-bf16"] = ("int4", INT4_GROUP, "float", None, torch.bfloat16)


@functools.lru_cache(maxsize=2)
def _torch_weights(k: int, n: int):
    """The float weight (N, K) and torch's packed forms: int8 per-channel (q8, s8), and int4 group 128
    as its int4pack kernels take it, w = (u - 8) * scale + zero, scale/zero as (K / G, N, 2)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).to(torch.int8)
    wg = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    sc = ((hi - lo) / 15).clamp_min(1e-8)
    u = torch.clamp(torch.round((wg - lo[..., None]) / sc[..., None]), 0, 15).to(torch.int32).view(n, k)
    sz = torch.stack([sc, lo + 8 * sc], -1).transpose(0, 1).contiguous()
    if GPU:
        u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # two values a byte, even k in the high nibble
        packed = torch._convert_weight_to_int4pack(u8.to(DEVICE), 8)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    return w.to(DEVICE), q8.to(DEVICE), s8.to(DEVICE), packed, sz.to(DEVICE)


def _peers(x: torch.Tensor, k: int, n: int, scheme: str) -> dict:
    """F.linear in x's dtype, and torch's packed kernel of the same scheme in bfloat16: on the CPU
    torch's int8/int4 kernels are fast only with bfloat16 activations (with float32 ones they are
    ~20x slower here), so they are timed on their fast path."""
    w, q8, s8, packed, sz = _torch_weights(k, n)
    xb = x.to(torch.bfloat16)
    wd, s8b, szb = w.to(x.dtype), s8.to(torch.bfloat16), sz.to(torch.bfloat16)
    int4 = torch._weight_int4pack_mm if GPU else torch._weight_int4pack_mm_for_cpu
    fns = {f"F.linear ({str(x.dtype)[6:]})": lambda: F.linear(x, wd)}
    if scheme == "int8":
        fns["torch._weight_int8pack_mm (bfloat16)"] = lambda: torch._weight_int8pack_mm(xb, q8, s8b)
    else:
        fns[f"torch.{int4.__name__} (bfloat16)"] = lambda: int4(xb, packed, INT4_GROUP, szb)
    return {name: (lambda f=f: contextlib.nullcontext(f)) for name, f in fns.items()}


def _params():
    out = [pytest.param(*TINY, v, id=f"tiny-{v}") for v in VARIANTS]
    return out + [pytest.param(m, k, n, v, id=f"M{m}-K{k}-N{n}-{v}") for (k, n) in SHAPES for m in MS
                  for v in VARIANTS]


@pytest.mark.parametrize("m,k,n,variant", _params())
def test_qmatmul(benchmark, m, k, n, variant):
    if benchmark.disabled and (m, k, n) != TINY:
        pytest.skip("only the tiny case runs with --benchmark-disable")
    scheme, group, act, backend, dtype = VARIANTS[variant]
    q = fastllm.quantize(_torch_weights(k, n)[0], scheme, group)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)

    def run():
        with fastllm.use_backend(backend) if backend else contextlib.nullcontext():
            return fastllm.qmatmul(x, q, act=act)

    case = {"op": "qmatmul", "variant": variant, "shape": [m, k, n], "dtype": str(dtype)[6:]}
    if m <= GEMV_MAX_M:  # bound by reading the weights
        measure = dict(suite="qmatmul", work=q.nbytes, unit="GB/s",
                       counted="bytes of fastllm's packed weight and scales, read once per call")
    else:  # bound by arithmetic
        measure = dict(suite="qmatmul-gemm", work=2 * m * n * k, unit="TFLOP/s", counted="2 M N K")
    compare(benchmark, run, _peers(x, k, n, scheme), group=f"qmatmul-M{m}-K{k}-N{n}", impl=f"fastllm {variant}",
            case=case, **measure)
