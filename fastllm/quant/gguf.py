"""Exact conversion between GGUF's Q8_0 / Q4_0 / Q4_1 blocks and QuantizedWeight.

A GGUF tensor of numpy shape (N, K) (GGUF's ne = [K, N]) in one of these types is stored as
uint8 (N, K // 32 * block_bytes), each row K // 32 blocks of 32 weights, as the `gguf` package's
reader and gguf.quants.quantize give it:
  Q8_0  34 bytes: d (float16), qs int8[32]                      w = qs * d
  Q4_0  18 bytes: d (float16), qs uint8[16]                     w = (nibble - 8) * d
  Q4_1  20 bytes: d (float16), m (float16), qs uint8[16]        w = nibble * d + m
with byte i of qs holding element i (low nibble) and 16 + i (high nibble). fastllm's "rows"
layout (formats.py) keeps the same values, nibble order and float16 scales in separate arrays, so
the conversion only moves bytes: the weights are used as they are, never dequantised.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import BLOCK
from .quantize import QuantizedWeight

# GGML type ids (ggml.h / gguf.GGMLQuantizationType) -> (name, fastllm scheme, bytes per block)
GGML_TYPES = {8: ("Q8_0", "int8", 34), 2: ("Q4_0", "int4", 18), 3: ("Q4_1", "int4_asym", 20)}
_BY_NAME = {name: t for t, (name, _, _) in GGML_TYPES.items()}


def _ggml_type(qtype) -> int:
    """qtype as an int id: a gguf.GGMLQuantizationType, its int value or its name ("Q4_0")."""
    if isinstance(qtype, str):
        if qtype.upper() not in _BY_NAME:
            raise ValueError(f"qtype must be one of {sorted(_BY_NAME)}, got {qtype!r}")
        return _BY_NAME[qtype.upper()]
    t = int(qtype)
    if t not in GGML_TYPES:
        raise ValueError(f"qtype must be one of {sorted(_BY_NAME)} (GGML types {sorted(GGML_TYPES)}), got {qtype!r}")
    return t


def from_gguf(blocks, qtype, shape=None) -> QuantizedWeight:
    """QuantizedWeight (group size 32) holding the same values as GGUF blocks.

    blocks: uint8 numpy array or tensor, (N, K // 32 * block_bytes) or flat with `shape` = (N, K)
    given; qtype: "Q8_0", "Q4_0", "Q4_1" or the gguf.GGMLQuantizationType. The result is on the
    blocks' device (CPU for numpy)."""
    t = _ggml_type(qtype)
    name, scheme, nbytes = GGML_TYPES[t]
    if isinstance(blocks, np.ndarray):
        blocks = torch.from_numpy(np.ascontiguousarray(blocks))
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError(f"blocks must be a uint8 numpy array or tensor, got {getattr(blocks, 'dtype', type(blocks))}")
    if shape is None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be 2-D (N, K // 32 * {nbytes}) when shape is not given, got "
                             f"{tuple(blocks.shape)}")
        shape = (blocks.shape[0], blocks.shape[1] // nbytes * BLOCK)
    n, k = (int(s) for s in shape)
    if n <= 0 or k <= 0 or k % BLOCK or blocks.numel() != n * k // BLOCK * nbytes \
            or (blocks.dim() == 2 and blocks.shape[1] % nbytes):
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not hold a {name} tensor of shape {(n, k)} "
                         f"({nbytes} bytes per block of {BLOCK}, K a multiple of {BLOCK})")
    b = blocks.contiguous().view(n, k // BLOCK, nbytes)
    scales = b[..., 0:2].contiguous().view(torch.float16).view(n, k // BLOCK)
    mins = b[..., 2:4].contiguous().view(torch.float16).view(n, k // BLOCK) if scheme == "int4_asym" else None
    qs = b[..., nbytes - (BLOCK if scheme == "int8" else BLOCK // 2):].contiguous()
    data = qs.view(torch.int8).view(n, k) if scheme == "int8" else qs.view(n, k // 2)
    return QuantizedWeight(data, scales, mins, scheme, BLOCK, (n, k))


def to_gguf(qweight: QuantizedWeight) -> tuple[np.ndarray, int]:
    """(uint8 (N, K // 32 * block_bytes), GGML type id): the GGUF blocks of a group-size-32 weight."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
    if qweight.group_size != BLOCK:
        raise ValueError(f"only group_size 32 weights have a GGUF block type, got group_size {qweight.group_size}")
    t = next(t for t, (_, s, _) in GGML_TYPES.items() if s == qweight.scheme)
    n, k = qweight.shape
    nb = k // BLOCK

    def as_bytes(x):
        return x.detach().cpu().contiguous().view(torch.uint8).view(n, nb, -1)

    parts = [as_bytes(qweight.scales)]
    if qweight.mins is not None:
        parts.append(as_bytes(qweight.mins))
    parts.append(as_bytes(qweight.data))
    return torch.cat(parts, dim=-1).view(n, -1).numpy(), t
