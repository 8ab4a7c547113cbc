"""decode_attention: one new token per sequence against a KV cache, GQA 32 query / 8 KV heads, head dim 128, bf16;
GB/s of the K and V bytes of the valid tokens (int8: codes and scales), against torch SDPA's flash and cuDNN
backends on the same cache, measured in the same run.

All sequences have the same length here (SDPA takes no per-sequence lengths). SDPA reads the same cache memory
through (B, Hkv, L, D) views with enable_gqa=True (where a backend refuses those, a contiguous copy with the KV
heads repeated is its input, and extra_info says so). Paged cases (block size 16, shuffled block table) compare
with SDPA on the contiguous cache of the same shape (SDPA has no paged form). On the GPU every implementation runs
as a CUDA graph of REPLAYS calls, as a captured decode step does, so the figures exclude Python overhead for all
alike. On CPU (fp32) the C++ kernel runs against torch's SDPA on the same cache, the Python calls included for
both; the first case is CI's small smoke run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastllm
from harness import DEVICE, compare

REPLAYS = 20
"""Calls per captured CUDA graph; the time of one call is the graph's time / REPLAYS."""
PAGE = 16
"""Block size of the paged cases (vLLM's default)."""
HEADS = (32, 8, 128)  # Hq, Hkv, D
CASES = ([(b, n, layout) for layout in ("contiguous", "paged") for b in (1, 16, 64) for n in (4096, 32768)]
         + [(1, 4096, "int8"), (16, 32768, "int8")] if DEVICE == "cuda"
         else [(1, 256, "contiguous"), (1, 4096, "contiguous"), (8, 2048, "contiguous"), (1, 4096, "paged"),
               (1, 4096, "int8")])


def _cache(b: int, n: int, layout: str):
    """q (B, 1, Hq, D), the cache arguments for fastllm.decode_attention, the contiguous k, v for SDPA (an int8
    cache dequantised), and the K/V bytes of the valid tokens fastllm reads (int8: codes and scales)."""
    hq, hkv, d = HEADS
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn((b, 1, hq, d), generator=g, device=DEVICE, dtype=dtype)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEVICE)
    if layout == "int8":
        codes = [torch.randint(-127, 128, (b, n, hkv, d), generator=g, device=DEVICE, dtype=torch.int8)
                 for _ in range(2)]
        scales = [torch.rand((b, n, hkv), generator=g, device=DEVICE) * 0.02 for _ in range(2)]
        kv = [c.to(dtype) * s[..., None].to(dtype) for c, s in zip(codes, scales)]
        args = dict(k_cache=codes[0], v_cache=codes[1], k_scale=scales[0], v_scale=scales[1])
        return q, lens, args, kv, 2 * b * n * hkv * (d + 4)
    kv = [torch.randn((b, n, hkv, d), generator=g, device=DEVICE, dtype=dtype) for _ in range(2)]
    args = dict(k_cache=kv[0], v_cache=kv[1])
    if layout == "paged":
        blocks = b * n // PAGE
        table = torch.randperm(blocks, generator=g, device=DEVICE).view(b, n // PAGE)
        paged = [torch.empty((blocks, PAGE, hkv, d), device=DEVICE, dtype=dtype) for _ in range(2)]
        for dst, src in zip(paged, kv):
            dst[table.flatten()] = src.view(blocks, PAGE, hkv, d)
        args = dict(k_cache=paged[0], v_cache=paged[1], block_table=table.int())
    return q, lens, args, kv, 2 * b * n * hkv * d * kv[0].element_size()


def _sdpa(q, k, v):
    """SDPA on (B, H, L, D) views of the cache; if the active backend refuses the GQA views, on a contiguous copy
    with the KV heads repeated. Returns (fn, how)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fn = (lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
    try:
        fn()
        return fn, "gqa views"
    except RuntimeError:
        group = qt.shape[1] // kt.shape[1]
        ke, ve = (t.repeat_interleave(group, 1).contiguous() for t in (kt, vt))
        return (lambda: F.scaled_dot_product_attention(qt, ke, ve)), "repeated heads (copy)"


def _graphed(fn):
    """fn as a CUDA graph of REPLAYS calls (warmed up on a side stream first, as torch asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            fn()
    return graph.replay


def _timed(fn):
    """What is timed for fn: on the GPU a CUDA graph of REPLAYS calls of it, on CPU fn itself."""
    return _graphed(fn) if DEVICE == "cuda" else fn


def _sdpa_peer(q, k, v, backend, inputs: dict):
    """A harness peer: SDPA under `backend` (None: torch's choice) on the same cache; inputs[name] records how it
    read it (_sdpa)."""
    @contextlib.contextmanager
    def make():
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            fn, inputs[backend] = _sdpa(q, k, v)
            yield _timed(fn)
    return make


def _peers():
    if DEVICE != "cuda":
        return {"torch sdpa": None}
    from torch.nn.attention import SDPBackend

    return {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}


@pytest.mark.parametrize("b,n,layout", CASES, ids=[f"B{b}-L{n}-{layout}" for b, n, layout in CASES])
def test_decode_attention(benchmark, b, n, layout):
    q, lens, args, (k, v), nbytes = _cache(b, n, layout)
    fn = (lambda: fastllm.decode_attention(q, cache_seqlens=lens, **args))
    inputs = {}
    peers = {name: _sdpa_peer(q, k, v, backend, inputs) for name, backend in _peers().items()}
    hq, hkv, d = HEADS
    calls = REPLAYS if DEVICE == "cuda" else 1
    compare(benchmark, _timed(fn), peers, group=f"decode_attention-B{b}-L{n}-{layout}", suite="decode_attention",
            case={"op": "decode_attention", "direction": "fwd", "shape": [b, n, hq, hkv, d], "layout": layout,
                  "dtype": str(q.dtype).replace("torch.", ""), "calls_per_timing": calls},
            work=nbytes * calls, unit="GB/s",
            counted="K and V bytes of the valid tokens fastllm reads (int8: codes and scales; SDPA reads the "
                    "same tokens dequantised), per call")
    if not benchmark.disabled:
        benchmark.extra_info["sdpa_input"] = {str(name): how for name, how in inputs.items()}
