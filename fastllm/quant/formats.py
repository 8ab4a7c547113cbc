"""Weight-only quantisation formats and fastllm's packed layout, documented once here.

A weight W: (N, K) (N output channels, K input features, as nn.Linear stores it) is cut along K
into groups of G consecutive elements; every group of every row has its own scale d (and, for the
asymmetric scheme, a min m). The schemes:

  "int8"       q in [-127, 127] (int8),  W ~= q * d.  G = K ("per-channel": group_size None,
               d float32, one per row) or G in {32, 64, 128} (d float16; G = 32 is GGUF Q8_0).
  "int4"       u in [0, 15] (4 bits),     W ~= (u - 8) * d.  G in {32, 64, 128}, d float16
               (G = 32 is GGUF Q4_0).
  "int4_asym"  u in [0, 15] (4 bits),     W ~= u * d + m.  G in {32, 64, 128}, d and m float16
               (G = 32 is GGUF Q4_1).

Packed layout "rows" (read as it is by the CPU kernels and by the CUDA GEMV, whose lanes each take
one 16-byte int4 block or 32 int8 bytes per 128-bit load; a tensor-core layout can be added to
LAYOUTS and converted to exactly from this one):
  data    int8:  int8 (N, K), row-major, element k of row n at [n, k].
          int4:  uint8 (N, K // 2). Each row is K // 32 blocks of 16 bytes; byte i of block b holds
                 element 32 b + i in its low nibble and element 32 b + 16 + i in its high nibble.
                 That is GGUF's own order within a Q4_0/Q4_1 block, so GGUF blocks convert by
                 copying bytes, and one 16-byte load, a 4-bit shift and a mask give the block's 32
                 values in order (low half, high half) for AVX2; a 64-byte load (4 blocks) gives
                 the low halves of the 4 blocks in its low nibbles and the high halves in its high
                 nibbles, the operand order of the AVX-512 VNNI dot products.
  scales  (N, K // G): float16 for group-wise formats (as GGUF stores them: exact conversion, and
          half the bytes of float32 in a memory-bound kernel); (N, 1) float32 for per-channel int8.
  mins    (N, K // G) float16 for "int4_asym", else absent.
K must be a multiple of 32 for every scheme (the int4 block, and the block of the int8-quantised
activations), and of G.

Dequantisation is exact in float32: q * d and u * d have at most 18 significant bits, and
u * d + m is rounded once; the kernels' float-activation mode computes the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4", "int4_asym")
GROUP_SIZES = (32, 64, 128)
BLOCK = 32
"""Elements per int4 block (16 bytes), and per block of int8-quantised activations."""
LAYOUTS = ("rows",)
"""Packed layouts: "rows" is documented above (the CPU kernels and the CUDA GEMV read it)."""
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128, "int4_asym": 128}


@dataclass(frozen=True)
class Format:
    """A scheme and its group size (None: per-channel int8). Validates the pair on creation."""

    scheme: str
    group_size: int | None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        g = self.group_size
        if g is None and self.scheme != "int8":
            raise ValueError(f"group_size must be one of {GROUP_SIZES} for scheme {self.scheme!r}, got None")
        if g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            allowed = GROUP_SIZES + ((None,) if self.scheme == "int8" else ())
            raise ValueError(f"group_size must be one of {allowed} for scheme {self.scheme!r}, got {g!r}")

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    @property
    def has_mins(self) -> bool:
        return self.scheme == "int4_asym"

    @property
    def qmin(self) -> int:
        return -127 if self.scheme == "int8" else 0

    @property
    def qmax(self) -> int:
        return 127 if self.scheme == "int8" else 15

    def group(self, k: int) -> int:
        return k if self.group_size is None else self.group_size

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.group_size is None else torch.float16

    def check_k(self, k: int, name: str = "K") -> None:
        """K must be a positive multiple of 32 and of the group size."""
        if k <= 0 or k % BLOCK or k % self.group(k):
            raise ValueError(f"{name} (the input-feature dimension) must be a positive multiple of {BLOCK} and of "
                             f"group_size {self.group_size}, got {k}")

    def data_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k) if self.bits == 8 else (n, k // 2)

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, k // self.group(k))

    @property
    def code(self) -> int:
        """Format code of the C++ kernels (csrc/cpu/ops.h QFormat)."""
        if self.scheme == "int8":
            return 0 if self.group_size is None else 1
        return 2 if self.scheme == "int4" else 3


# ---- int4 packing ------------------------------------------------------------------------------
def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """u: (N, K) integer values in [0, 15] -> uint8 (N, K // 2) in the "rows" layout."""
    n, k = u.shape
    b = u.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K // 2) in the "rows" layout -> uint8 (N, K) values in [0, 15]."""
    n, h = data.shape
    b = data.view(n, h // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, 2 * h)


def dequantize(data: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, fmt: Format,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that packed (data, scales, mins) stand for, computed in float32
    (exact, see the module docstring) and returned in `dtype`."""
    n = data.shape[0]
    q = unpack_int4(data).to(torch.float32) if fmt.bits == 4 else data.to(torch.float32)
    k = q.shape[1]
    g = fmt.group(k)
    if fmt.scheme == "int4":
        q = q - 8
    d = scales.to(torch.float32).view(n, k // g, 1)
    w = q.view(n, k // g, g) * d
    if fmt.has_mins:
        w = w + mins.to(torch.float32).view(n, k // g, 1)
    return w.view(n, k).to(dtype)


def int4_exact(scales: torch.Tensor, mins: torch.Tensor | None) -> bool:
    """Whether an int4 weight's every value (u - 8) d ("int4", mins None) or u d + m ("int4_asym"), u in [0, 15],
    is exact in float32 with the unrounded value, and every d and m is finite: then x . w may be computed as
    sum_b d_b sum_i (u_i - 8) x_i (+ sum_g (m_g + 8 d_g) sum_i x_i), the scales factored out of the block sums (the
    CPU float mode does so at M = 1). (u - 8) d always is (4 x 11 significant bits). For u d + m, with float16 d and
    m of exponents e_d and e_m (floor(log2 |.|), at least -14, the subnormals' step): |u d + m| < 2^max(e_d + 6,
    e_m + 2) and it is a multiple of 2^(min(e_d, e_m) - 10), so float32's 24 bits hold it when
    -8 <= e_m - e_d <= 12, or when d or m is zero. Real Q4_1 blocks have m near -8 d. scales and mins: float16."""
    def exponent(t):  # float16 bits -> (biased exponent field at least 1, is zero)
        bits = t.view(torch.int16).to(torch.int32)
        return ((bits >> 10) & 0x1F).clamp(min=1), (bits & 0x7FFF) == 0

    ed, d_zero = exponent(scales)
    if mins is None:
        return bool((ed < 31).all())
    em, m_zero = exponent(mins)
    spread = em - ed
    ok = (ed < 31) & (em < 31) & (d_zero | m_zero | ((spread >= -8) & (spread <= 12)))
    return bool(ok.all())
