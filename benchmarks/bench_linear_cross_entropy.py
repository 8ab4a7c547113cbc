"""Fused linear + cross-entropy (forward + backward) against torch's F.linear + F.cross_entropy: time (TFLOP/s of
the three matmuls, 6 N V D FLOPs) and peak memory above the inputs (harness.peak_bytes: CUDA's allocator peak, or
the CPU process's peak resident set), at the vocabularies of SmolLM2 (49152) and Llama 3 (128256). GPU: 8192
tokens in bf16; CPU: 512 tokens in fp32, and a tiny case (the only one CI runs, with --benchmark-disable)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastllm
from harness import DEVICE, compare, peak_bytes

# (tokens N, hidden D, vocab V, dtype)
GPU_CASES = [(8192, 576, 49152, torch.bfloat16), (8192, 4096, 128256, torch.bfloat16)]
CPU_CASES = [(256, 64, 4096, torch.float32), (512, 576, 49152, torch.float32), (512, 576, 128256, torch.float32)]
TINY = CPU_CASES[0]  # the case CI runs (--benchmark-disable)
CASES = CPU_CASES if DEVICE == "cpu" else GPU_CASES


def _step(fn, h, w, t):
    """One forward + backward of fn(h, w, t) -> scalar loss; the gradients are dropped afterwards."""
    def run():
        h.grad = w.grad = None
        fn(h, w, t).backward()
    return run


def _fused(h, w, t):
    return fastllm.linear_cross_entropy(h, w, t)


def _unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


@pytest.mark.parametrize("n,d,v,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_linear_cross_entropy(benchmark, n, d, v, dtype):
    if benchmark.disabled and DEVICE == "cpu" and (n, d, v, dtype) != TINY:
        pytest.skip("CI (--benchmark-disable) runs the tiny CPU case only")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(n, d, generator=g, device=DEVICE, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, device=DEVICE, dtype=dtype) * d ** -0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    fused, unfused = _step(_fused, h, w, t), _step(_unfused, h, w, t)
    compare(benchmark, fused, {"torch": lambda: contextlib.nullcontext(unfused)}, group=f"lce-{n}x{d}x{v}",
            suite="linear_cross_entropy", case={"op": "linear_cross_entropy", "direction": "fwd+bwd",
                                                "shape": [n, d, v], "dtype": str(dtype).replace("torch.", "")},
            work=6 * n * v * d, unit="TFLOP/s", counted="6 N V D: the logits matmul and its two gradients")
    if not benchmark.disabled:
        peaks = {"fastllm": peak_bytes(fused), "torch": peak_bytes(unfused)}
        benchmark.extra_info["peak_bytes"] = peaks
        if peaks["torch"]:
            benchmark.extra_info["peak_ratio_vs_torch"] = peaks["fastllm"] / peaks["torch"]
