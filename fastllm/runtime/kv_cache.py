"""A static (pre-allocated) KV cache for generation: per layer one (B, Lmax, Hkv, D) key and value buffer (the
contiguous cache layout of fastllm.decode_attention / kv_cache_append), allocated once for the longest
sequence a generation may reach, so that no step allocates and a decode step's tensors keep their addresses
(what CUDA graphs need).

Rows are ragged: row b holds its own `lengths[b]` tokens in slots [0, lengths[b]); prompts of different
lengths need no padding. `cos`, `sin` (Lmax, D) float32 are the rotary tables by absolute position, which
kv_cache_append applies to each new key and query.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """k[layer], v[layer]: (B, Lmax, Hkv, D); lengths: (B,) int32 on the device (tokens held per row);
    longest: an upper bound of lengths on the host (every decode step adds one token to every row, so it is
    known without reading the device)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, cos: torch.Tensor, sin: torch.Tensor):
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.longest = 0
        self.max_len, self.batch = max_len, batch
        self.cos, self.sin = cos, sin                                   # (Lmax, D) float32

    def check_room(self, new: int) -> None:
        if self.longest + new > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions per row; {self.longest} + {new} "
                             f"do not fit")

    def release(self, row: int) -> None:
        """Forget row's tokens (length 0): decode steps then keep rewriting its slot 0, harmlessly, until
        prefill gives the row a new sequence."""
        self.lengths[row] = 0

    def first_rows(self, n: int) -> "StaticKVCache":
        """A cache over rows [0, n) that shares this one's storage: a decode step on it computes and writes
        only those rows (a server keeps its live sequences in the lowest rows and decodes just that prefix).
        `longest` is the view's own; the caller sets it."""
        if not 0 < n <= self.batch:
            raise ValueError(f"n must be in [1, {self.batch}], got {n}")
        view = object.__new__(StaticKVCache)
        view.k, view.v, view.lengths = self.k[:, :n], self.v[:, :n], self.lengths[:n]
        view.longest, view.max_len, view.batch = self.longest, self.max_len, n
        view.cos, view.sin = self.cos, self.sin
        return view
