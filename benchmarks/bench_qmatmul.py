"""fastllm.qmatmul (weight-only int8 / int4) against torch's peers on the same shapes in the same run.

CPU (float32 activations): fp32 F.linear, torch._weight_int8pack_mm (int8 per-channel) and
torch._weight_int4pack_mm_for_cpu (int4, group 128), M in {1, 8}, (K, N) in {(4096, 4096),
(4096, 11008)}. GPU (bfloat16): bf16 F.linear, torch._weight_int8pack_mm, torch._weight_int4pack_mm,
M in {1, 16, 128}, (K, N) in {(4096, 4096), (4096, 14336), (8192, 28672)} (fastllm has no CUDA
qmatmul kernel yet: its figure there is the dequantise-then-matmul reference).
fastllm variants: int8 (per-channel) and int4 (symmetric, group 128), each with float activations
(act="float") and int8 activations (act="int8"). extra_info records milliseconds, effective weight
GB/s (the bytes of the packed weight and its scales, read once), the peers' figures and the
speedups. Under --benchmark-disable only the tiny case runs (CI)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm import _bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)] if GPU else [(4096, 4096), (4096, 11008)]
MS = [1, 16, 128] if GPU else [1, 8]
TINY = (1, 256, 256)  # (M, K, N): the case CI runs once
DTYPE = torch.bfloat16 if GPU else torch.float32
INT4_GROUP = 128
VARIANTS = {"int8": ("int8", None, "float"), "int8-act8": ("int8", None, "int8"),
            "int4": ("int4", INT4_GROUP, "float"), "int4-act8": ("int4", INT4_GROUP, "int8")}


@functools.lru_cache(maxsize=4)
def _weights(k: int, n: int):
    """The float weight and torch's own packed int8 / int4 forms of it."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).to(torch.int8)
    wg = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    sc = ((hi - lo) / 15).clamp_min(1e-8)
    u = torch.clamp(torch.round((wg - lo[..., None]) / sc[..., None]), 0, 15).to(torch.int32).view(n, k)
    zeros = lo + 8 * sc
    sz = torch.stack([sc, zeros], -1).transpose(0, 1).contiguous()  # (K / G, N, 2): w = (u - 8) * scale + zero
    w, q8, s8, sz = (t.to(DEVICE) for t in (w, q8, s8, sz))
    if GPU:
        u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # two values a byte, even k in the high nibble
        packed = torch._convert_weight_to_int4pack(u8.to(DEVICE), 8)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    return w, q8, s8, packed, sz


def _peers(x: torch.Tensor, k: int, n: int) -> dict:
    w, q8, s8, packed, sz = _weights(k, n)
    wd, s8d, szd = w.to(x.dtype), s8.to(x.dtype), sz.to(x.dtype)
    int4 = torch._weight_int4pack_mm if GPU else torch._weight_int4pack_mm_for_cpu
    return {"F.linear": lambda: F.linear(x, wd), "torch_int8": lambda: torch._weight_int8pack_mm(x, q8, s8d),
            "torch_int4": lambda: int4(x, packed, INT4_GROUP, szd)}


def _params():
    out = [pytest.param(*TINY, v, id=f"tiny-{v}") for v in VARIANTS]
    out += [pytest.param(m, k, n, v, id=f"M{m}-K{k}-N{n}-{v}") for (k, n) in SHAPES for m in MS for v in VARIANTS]
    return out


@pytest.mark.parametrize("m,k,n,variant", _params())
def test_qmatmul(benchmark, m, k, n, variant):
    if benchmark.disabled and (m, k, n) != TINY:
        pytest.skip("only the tiny case runs with --benchmark-disable")
    scheme, group, act = VARIANTS[variant]
    w = _weights(k, n)[0]
    q = fastllm.quantize(w, scheme, group)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    fn = _bench.synchronized(lambda: fastllm.qmatmul(x, q, act=act), DEVICE)
    benchmark.group = f"qmatmul-M{m}-K{k}-N{n}"
    if not benchmark.disabled:
        _bench.warm_up(fn)
    benchmark(fn)
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.median
    info = {"op": "qmatmul", "variant": variant, "shape": [m, k, n], "dtype": str(DTYPE).replace("torch.", ""),
            "weight_bytes": q.nbytes, "ms": seconds * 1e3, "weight_gbps": q.nbytes / seconds / 1e9,
            **_bench.environment(DEVICE)}
    peers = _peers(x, k, n)
    wanted = ["F.linear", "torch_int8" if scheme == "int8" else "torch_int4"]
    for name in wanted:
        peer_s = _bench.time_it(_bench.synchronized(peers[name], DEVICE), DEVICE)
        info[f"{name}_ms"] = peer_s * 1e3
        info[f"speedup_vs_{name}"] = peer_s / seconds
    benchmark.extra_info.update(info)
