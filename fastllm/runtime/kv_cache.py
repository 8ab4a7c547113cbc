"""Pre-allocated KV caches for generation, in the two layouts of fastllm.decode_attention / kv_cache_append.

StaticKVCache: per layer one (B, Lmax, Hkv, D) key and value buffer, one row per sequence, allocated once for
the longest sequence a generation may reach (fastllm.LLM.generate: every row lives as long as the batch).

PagedKVCache: per layer a pool of (num_blocks, block_size, Hkv, D) blocks shared by all sequences; row b's
position n lives in block block_table[b, n // block_size] at slot n % block_size. A sequence holds only the
blocks it reserved (a server reserves prompt + max_tokens positions when it admits a request and returns the
blocks when it finishes), so short requests cost little memory and many more of them fit than rows of Lmax
would allow. Block 0 is a scratch block never given to a sequence: unreserved table entries point at it, so a
free row that a decode step still visits writes there harmlessly.

int8 caches (dtype torch.int8): k, v hold int8 codes and k_scale, v_scale (k's shape without D, float32) one
symmetric scale per position and kv head (fastllm.kv_cache_append's quantisation: a quarter of fp32's bytes, half
of bf16's, for decode_attention to read); None otherwise.

Both: rows are ragged, row b holds its own `lengths[b]` tokens in positions [0, lengths[b]) without padding;
nothing allocates per step and the tensors keep their addresses (what CUDA graphs need). `cos`, `sin`
(Lmax, D) float32 are the rotary tables by absolute position, which kv_cache_append applies to each new key
and query. `block_table` is None for the static layout; the model passes it to the ops as it is.
"""
from __future__ import annotations

import math

import torch

from ..reference.decode_attention import quantize_int8

SCRATCH_BLOCK = 0  # the paged pool's block that no sequence owns


def _storage(shape: tuple, dtype: torch.dtype, device) -> tuple:
    """(k, v, k_scale, v_scale) zero buffers of `shape` (..., Hkv, D): int8 codes with float32 scales, or dtype."""
    k, v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
    if dtype != torch.int8:
        return k, v, None, None
    return (k, v, *(torch.zeros(shape[:-1], dtype=torch.float32, device=device) for _ in range(2)))


def _store(cache, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
    """cache.k[layer][index] = k (likewise v), quantised first for an int8 cache."""
    if cache.k_scale is None:
        cache.k[layer][index], cache.v[layer][index] = k, v
        return
    for codes, scales, x in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        codes[layer][index], scales[layer][index] = quantize_int8(x)


class StaticKVCache:
    """k[layer], v[layer]: (B, Lmax, Hkv, D) (int8: with k_scale[layer], v_scale[layer] (B, Lmax, Hkv)); lengths:
    (B,) int32 on the device (tokens held per row); longest: an upper bound of lengths on the host (every decode
    step adds one token to every row, so it is known without reading the device)."""
    block_table = None

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, cos: torch.Tensor, sin: torch.Tensor):
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k, self.v, self.k_scale, self.v_scale = _storage(shape, dtype, device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.longest = 0
        self.max_len, self.batch = max_len, batch
        self.cos, self.sin = cos, sin                                   # (Lmax, D) float32

    def check_room(self, new: int) -> None:
        if self.longest + new > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions per row; {self.longest} + {new} "
                             f"do not fit")

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v (T, Hkv, D) of layer at (rows[t], positions[t]) (both (T,) int64)."""
        _store(self, layer, (rows, positions), k, v)

    def scales(self, layer: int) -> tuple:
        """(k_scale, v_scale) of layer for fastllm.kv_cache_append / decode_attention: None, None unless int8."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def release(self, row: int) -> None:
        """Forget row's tokens (length 0): decode steps then keep rewriting its slot 0, harmlessly, until
        prefill gives the row a new sequence."""
        self.lengths[row] = 0

    def first_rows(self, n: int) -> "StaticKVCache":
        """A cache over rows [0, n) that shares this one's storage: a decode step on it computes and writes
        only those rows (a server keeps its live sequences in the lowest rows and decodes just that prefix).
        `longest` is the view's own; the caller sets it."""
        _check_rows(n, self.batch)
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.k, view.v, view.lengths = self.k[:, :n], self.v[:, :n], self.lengths[:n]
        if self.k_scale is not None:
            view.k_scale, view.v_scale = self.k_scale[:, :n], self.v_scale[:, :n]
        view.batch = n
        return view


class PagedKVCache(StaticKVCache):
    """k[layer], v[layer]: (num_blocks, block_size, Hkv, D) (int8: with scales, as StaticKVCache); block_table
    (B, ceil(max_len / block_size)) int32 on the device; lengths (B,) int32; longest as in StaticKVCache. Host
    bookkeeping: `free` (the blocks no row holds) and `owned[b]` (row b's blocks, in position order). max_len
    bounds one row's positions (the table's width); the pool may hold fewer positions than batch * max_len."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, cos: torch.Tensor, sin: torch.Tensor, *,
                 block_size: int, num_blocks: int):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks must be an int >= 2 (block 0 is scratch), got {num_blocks!r}")
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k, self.v, self.k_scale, self.v_scale = _storage(shape, dtype, device)
        self.block_size, self.num_blocks = block_size, num_blocks
        width = math.ceil(max_len / block_size)
        self.block_table = torch.full((batch, width), SCRATCH_BLOCK, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.longest = 0
        self.max_len, self.batch = max_len, batch
        self.cos, self.sin = cos, sin
        self.free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))   # popped from the end: lowest first
        self.owned: list[list[int]] = [[] for _ in range(batch)]

    def blocks_for(self, positions: int) -> int:
        """Blocks a sequence of `positions` positions needs."""
        return math.ceil(positions / self.block_size)

    def reserve(self, row: int, positions: int) -> bool:
        """Give row enough blocks for `positions` positions (keeping those it has); False, changing nothing,
        when the pool has too few free blocks. Raises ValueError past the row's max_len."""
        if not 0 <= row < self.batch:
            raise ValueError(f"row must be in [0, {self.batch}), got {row}")
        if positions > self.max_len:
            raise ValueError(f"a row holds at most {self.max_len} positions, {positions} asked")
        need = self.blocks_for(positions) - len(self.owned[row])
        if need > len(self.free):
            return False
        if need > 0:
            self.owned[row] += [self.free.pop() for _ in range(need)]
            table = self.owned[row] + [SCRATCH_BLOCK] * (self.block_table.shape[1] - len(self.owned[row]))
            self.block_table[row] = torch.tensor(table, dtype=torch.int32)
        return True

    def check_room(self, new: int) -> None:
        """As StaticKVCache.check_room, and on the CPU also per row: a row holding blocks must hold them for its
        next `new` positions (past them its table points at the scratch block, shared by every row: the writes
        would land there and the attention read other rows' keys). On CUDA reading the lengths would
        synchronise, so there the caller vouches for its reservations (the server reserves up front)."""
        super().check_room(new)
        if self.lengths.device.type != "cpu":
            return
        for row, length in enumerate(self.lengths.tolist()):
            held = len(self.owned[row])
            if held and length + new > held * self.block_size:
                raise ValueError(f"row {row} holds {length} positions in {held} block(s) of {self.block_size}: "
                                 f"reserve room for {length + new} first (cache.reserve)")

    def write(self, layer, rows, positions, k, v) -> None:
        blocks = self.block_table[rows, positions // self.block_size].long()
        slots = positions % self.block_size
        _store(self, layer, (blocks, slots), k, v)

    def release(self, row: int, *, device: bool = True) -> None:
        """Return row's blocks to the pool and forget its tokens (length 0, table pointing at the scratch block).
        device=False does only the host bookkeeping (it cannot fail after a device error); the caller then resets
        the row's length and table before a decode step visits it again (reserve rewrites the whole table row)."""
        self.free += reversed(self.owned[row])
        self.owned[row] = []
        if device:
            self.block_table[row] = SCRATCH_BLOCK
            self.lengths[row] = 0

    def first_rows(self, n: int) -> "PagedKVCache":
        """As StaticKVCache.first_rows: rows [0, n) of the table and lengths, the whole block pool (shared)."""
        _check_rows(n, self.batch)
        view = object.__new__(PagedKVCache)
        view.__dict__.update(self.__dict__)
        view.block_table, view.lengths, view.batch = self.block_table[:n], self.lengths[:n], n
        return view


def _check_rows(n: int, batch: int) -> None:
    if not 0 < n <= batch:
        raise ValueError(f"n must be in [1, {batch}], got {n}")
