"""fastllm.attention forward and backward against torch SDPA with each of its backends, in TFLOP/s.

Each case times fastllm.attention with pytest-benchmark and, in the same test (harness.compare),
F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(backend) for the flash, cuDNN,
memory-efficient and math backends. A backend that refuses a case (flash with a mask, a head dim it
lacks, ...) or would not fit in memory (math at 16k) is recorded as unsupported with the reason.

FLOPs (FlashAttention's count): forward 4 B Hq Lq Lk D (two matmuls of 2 B Hq Lq Lk D), halved when
causal; backward 2.5x the forward (five matmuls, of which the recomputation of the scores is not counted).
The masked case counts the dense product: with a mask (and no is_causal) every kernel here visits every
key block. Backward times torch.autograd.grad of a fixed output with a fixed dout (retain_graph), so it
is the backward alone: no forward is repeated.

Shapes follow FlashAttention's benchmarks: B * L = 16k tokens and Hq * D = 2048 (a 2048-wide model; at
D = 96, 21 heads), so the work per case grows with L and every case takes milliseconds. Inputs are
(B, L, H, D) tensors seen as (B, H, L, D) through transpose(1, 2), as a model's projections give them.
The GPU grid is not the full cross product (4 head dims x 3 lengths x 2 dtypes x 2 causal x 2 directions
would not fit the few minutes a GPU session has for all benchmarks); it is sweeps through the common
point (bf16, L = 4k, D = 128), each in both directions and causal or not:
    head dims 64, 96 (not a power of two: fastllm pads its tiles to 128), 128, 256 at L = 4k;
    lengths 1k, 4k, 16k at D = 128;
    fp16 at the common point (same tensor-core rate as bf16: checks nothing is slower in the other dtype);
    GQA, Hq = 16 over Hkv = 4 (Llama-3's ratio), causal; a bool mask (B, 1, L, L) of causal + key padding
    (what a padded batch hands SDPA), not causal.
That is 16 shapes x 2 directions = 32 tests; each times fastllm and the 4 peers for about 0.2 s apiece,
so the grid takes about a minute plus Triton's first compilations of each kernel variant.
On CPU (CI) three tiny fp32 cases run instead: fastllm runs its torch reference there and the peers are
torch's CPU SDPA (flash and math; the others refuse).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastllm
from harness import DEVICE, Unsupported, compare

TOKENS = 16 * 1024
"""B * L of every GPU case."""
WIDTH = 2048
"""Hq * D of every GPU case (the model width); D = 96 gets 2048 // 96 = 21 heads."""
MIN_TIME = 0.1
"""Seconds of timing per implementation per case (and as much warm-up): enough for a stable median of
millisecond kernels, short enough for the whole grid to fit a GPU session's time."""
pytestmark = pytest.mark.benchmark(max_time=MIN_TIME)

PEERS = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
         "torch-efficient": SDPBackend.EFFICIENT_ATTENTION, "torch-math": SDPBackend.MATH}

MATH_SCORE_COPIES = {"fwd": 4, "bwd": 7}
"""Upper estimate of how many (B, Hq, Lq, Lk) float32 tensors torch's math backend holds at once (it computes
fp16/bf16 in fp32 unless allow_fp16_bf16_reduction_math_sdp): in the forward the scores, the softmax and the
copy _safe_softmax makes to zero fully masked rows, with its bool mask; in the backward also what the retained
graph keeps and the gradients of the probabilities and the scores. Out-of-memory is caught as well."""
MEMORY_MARGIN = 0.9
"""Fraction of the free device memory the math backend may be expected to use before it is skipped."""


@dataclass(frozen=True)
class Shape:
    """q: (batch, heads, seqlen, head_dim), k and v: (batch, kv_heads, seqlen, head_dim)."""

    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    causal: bool = False
    masked: bool = False

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def id(self) -> str:
        heads = f"H{self.heads}" + (f"kv{self.kv_heads}" if self.gqa else "")
        return "-".join([str(self.dtype).replace("torch.", ""), f"B{self.batch}", heads, f"L{self.seqlen}",
                         f"D{self.head_dim}"] + ["causal"] * self.causal + ["mask"] * self.masked)

    def flops(self, direction: str) -> float:
        fwd = 4 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim / (2 if self.causal else 1)
        return fwd * (2.5 if direction == "bwd" else 1.0)

    def info(self, direction: str) -> dict:
        return {"op": "attention", "direction": direction, "dtype": str(self.dtype).replace("torch.", ""),
                "batch": self.batch, "heads_q": self.heads, "heads_kv": self.kv_heads, "seqlen": self.seqlen,
                "head_dim": self.head_dim, "causal": self.causal,
                "mask": "bool (B, 1, L, L): causal and key padding" if self.masked else None}


def _gpu(dtype=torch.bfloat16, seqlen=4096, head_dim=128, causal=False, kv_heads=None, masked=False) -> Shape:
    heads = WIDTH // head_dim
    return Shape(dtype, TOKENS // seqlen, heads, kv_heads or heads, seqlen, head_dim, causal, masked)


def _shapes() -> list[Shape]:
    if DEVICE == "cpu":
        return [Shape(torch.float32, 1, 2, 2, 128, 64), Shape(torch.float32, 1, 2, 1, 128, 64, causal=True),
                Shape(torch.float32, 1, 2, 2, 128, 64, masked=True)]
    shapes = []
    for causal in (False, True):
        shapes += [_gpu(head_dim=d, causal=causal) for d in (64, 96, 128, 256)]
        shapes += [_gpu(seqlen=n, causal=causal) for n in (1024, 16384)]
        shapes.append(_gpu(torch.float16, causal=causal))
    return shapes + [_gpu(causal=True, kv_heads=4), _gpu(masked=True)]


def _inputs(s: Shape, requires_grad: bool):
    """q, k, v as (B, H, L, D) views of (B, L, H, D) tensors, and the mask (or None); seeded, so every
    implementation gets the same values."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def make(heads: int) -> torch.Tensor:
        t = torch.randn(s.batch, s.seqlen, heads, s.head_dim, generator=g, device=DEVICE, dtype=s.dtype)
        return t.transpose(1, 2).requires_grad_(requires_grad)

    q, k, v = make(s.heads), make(s.kv_heads), make(s.kv_heads)
    mask = None
    if s.masked:
        # batch element b attends causally over its first L - (b + 1) L / 4B keys (the rest is padding)
        pos = torch.arange(s.seqlen, device=DEVICE)
        valid = s.seqlen - (torch.arange(s.batch, device=DEVICE) + 1) * s.seqlen // (4 * s.batch)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, None, :] < valid[:, None, None])
        mask = mask[:, None]  # (B, 1, L, L)
    return q, k, v, mask


def _runner(attention, s: Shape, direction: str):
    """A no-argument callable running `attention` (fastllm.attention or F.scaled_dot_product_attention)
    forward, or the backward of one fixed forward (torch.autograd.grad with a fixed dout)."""
    q, k, v, mask = _inputs(s, requires_grad=direction == "bwd")

    def forward():
        return attention(q, k, v, attn_mask=mask, is_causal=s.causal, enable_gqa=s.gqa)

    if direction == "fwd":
        return forward
    out = forward()
    dout = torch.randn(out.shape, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE,
                       dtype=out.dtype)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def _check_math_fits(s: Shape, direction: str) -> None:
    if not DEVICE.startswith("cuda"):
        return
    need = MATH_SCORE_COPIES[direction] * s.batch * s.heads * s.seqlen * s.seqlen * 4
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if need > MEMORY_MARGIN * free:
        raise Unsupported(f"skipped: the math backend would need about {need / 2**30:.0f} GiB of fp32 scores, "
                          f"{free / 2**30:.0f} GiB is free")


def _sdpa_peer(backend: SDPBackend, s: Shape, direction: str):
    """The harness.Peer running torch SDPA on `backend` only (the forward, and the one the backward
    replays, run under sdpa_kernel)."""
    @contextlib.contextmanager
    def setup():
        if backend == SDPBackend.MATH:
            _check_math_fits(s, direction)
        with sdpa_kernel(backend):
            yield _runner(F.scaled_dot_product_attention, s, direction)

    return setup


@pytest.mark.parametrize("direction", ("fwd", "bwd"))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: s.id)
def test_attention(benchmark, shape: Shape, direction: str):
    peers = {name: _sdpa_peer(backend, shape, direction) for name, backend in PEERS.items()}
    compare(benchmark, _runner(fastllm.attention, shape, direction), peers, group=f"attention-{direction}-{shape.id}",
            suite="attention", case=shape.info(direction), work=shape.flops(direction), unit="TFLOP/s",
            counted="FLOPs: forward 4 B Hq Lq Lk D (halved when causal; dense when masked), backward 2.5x forward",
            min_time=MIN_TIME, warm_up_time=MIN_TIME)
