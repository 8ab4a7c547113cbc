"""What every decoder-only model shares: the three ways of running it, over the same blocks.

    model(tokens)               whole sequences (B, L) at positions 0..L-1, causal, no cache -> logits (B, L, V)
                                (tests, scoring): fastllm.attention; model.hidden(tokens) stops before lm_head
                                (training: fastllm.linear_cross_entropy takes it from there)
    model.prefill(prompts, c)   ragged prompts packed back to back into rows of the static KV cache c ->
                                logits of each prompt's last token (B, V): fastllm.attention_varlen
    model.decode(tokens, c)     one new token per row at the row's length -> logits (B, V):
                                fastllm.kv_cache_append (rotary fused, written in place) + decode_attention;
                                its blocks (decode_hidden) are what a CPU graph records (runtime/cpu_graph.py)
A block maps (h, pending), whose sum is the hidden state, to the next such pair (so that a norm can fuse the
residual add), and calls attend(layer, q, k, v) with q (..., Hq, D), k, v (..., Hkv, D) before any rotary; the
mode decides what attention runs. A model gives `embed(tokens, positions)`, `final_norm(h, pending)` and, for
rotary models, `rotary` (None for learned positions).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

import fastllm

from ..ops._kv_cache import trusted_positions
from ..runtime.kv_cache import PagedKVCache, StaticKVCache
from .rope import apply_rotary


class DecoderLM(nn.Module):
    """Subclasses set cfg, tok_embeddings, layers, norm, lm_head, rotary (a Rotary, or None for learned
    positions: set as an attribute, not a class default, which would hide nn.Module's submodule) and embed().
    kv_cache_dtype: the dtype of the caches new_cache makes by default: None (the model's own) or torch.int8
    (fastllm.LLM.load(kv_cache="int8") sets it)."""
    kv_cache_dtype: torch.dtype | None = None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, *, block_size: int | None = None,
                  num_blocks: int | None = None, dtype: torch.dtype | None = None) -> StaticKVCache:
        """A StaticKVCache of batch rows of max_len positions, or with block_size a PagedKVCache whose pool
        has num_blocks blocks (block 0 is scratch) and whose rows reach at most max_len positions. dtype: the
        model's own (default, unless kv_cache_dtype is set) or torch.int8 (codes with a scale per position and
        kv head: a quarter of fp32's bytes; prefill stores its keys and values quantised, attends to them exact)."""
        self.check_context(max_len, "max_len")
        p = self.tok_embeddings.weight
        dtype = dtype or self.kv_cache_dtype or p.dtype
        if dtype not in (p.dtype, torch.int8):
            raise ValueError(f"a KV cache holds the model's dtype {p.dtype} or torch.int8, got {dtype}")
        cos, sin = self.rotary.table(max_len) if self.rotary is not None else (None, None)   # (Lmax, D)
        args = (self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype, p.device,
                cos, sin)
        if block_size is None:
            return StaticKVCache(*args)
        return PagedKVCache(*args, block_size=block_size, num_blocks=num_blocks)

    def check_context(self, n: int, name: str) -> None:
        """ValueError naming `name` when n positions exceed the model's context cfg.max_seq_len (learned positions
        have no row past it, rotary ones were not trained there), except with dynamic (NTK) rotary scaling, which
        exists to stretch the context past it (transformers runs it on longer sequences the same way). The entry
        points check their inputs with it: forward / hidden (tokens) and new_cache (max_len), which bounds prefill and
        decode (cache.max_len), so the decode step itself checks nothing."""
        dynamic = self.rotary is not None and self.cfg.rope_type == "dynamic"
        if n > self.cfg.max_seq_len and not dynamic:
            raise ValueError(f"{name} has {n} positions, more than the model's context of {self.cfg.max_seq_len} "
                             f"(max_position_embeddings)")

    def _rotate(self, q, k, cos, sin):
        if cos is None:
            return q, k
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def final_norm(self, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The final norm of the hidden state h + pending (pending None: h alone); Llama fuses the add."""
        return self.norm(h if pending is None else h + pending)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        return self._layers(self.embed(tokens, positions), attend)

    def _layers(self, h: torch.Tensor, attend) -> torch.Tensor:
        """The blocks and the final norm over the embedded h (..., dim). A block maps the hidden state h + pending
        to a pair whose sum is its output, so the next norm can fuse the residual add."""
        pending = None
        for layer in self.layers:
            h, pending = layer(h, pending, attend)
        return self.final_norm(h, pending)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))                                     # (B, L, vocab)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (B, L, dim) of the cache-free full forward, before lm_head (training
        feeds them to fastllm.linear_cross_entropy with lm_head.weight, so the logits are never formed)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 or int32 tensor of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
        b, l = tokens.shape
        self.check_context(l, "tokens")
        positions = torch.arange(l, device=tokens.device).expand(b, l)              # (B, L)
        cos, sin = self.rotary(positions) if self.rotary is not None else (None, None)   # (B, L, D)

        def attend(i, q, k, v):                                                      # (B, L, H, D)
            q, k = self._rotate(q, k, cos, sin)
            y = fastllm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                  enable_gqa=True)                                   # (B, Hq, L, D)
            return y.transpose(1, 2)

        return self._run(tokens, positions, attend)

    def prefill(self, prompts: list[list[int]], cache: StaticKVCache, rows: list[int] | None = None) -> torch.Tensor:
        """Cache row rows[i] (default i) gets prompts[i] from slot 0, replacing what it held; the other rows are
        left alone (a server admits new requests into free rows this way). Returns the logits of each prompt's
        last token, (len(prompts), vocab)."""
        device = cache.lengths.device
        lens = [len(p) for p in prompts]
        longest = max(lens)
        rows = list(range(len(prompts))) if rows is None else list(rows)
        if len(rows) != len(prompts) or len(set(rows)) != len(rows) or not all(0 <= r < cache.batch for r in rows):
            raise ValueError(f"rows must name {len(prompts)} distinct cache rows in [0, {cache.batch}), got {rows}")
        if longest > cache.max_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit the KV cache's {cache.max_len} positions")
        if cache.block_table is not None:
            for r, n in zip(rows, lens):
                if not cache.reserve(r, n):
                    raise ValueError(f"the paged KV cache has {len(cache.free)} free blocks of {cache.block_size} "
                                     f"positions: too few for a prompt of {n} tokens in row {r}")
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)      # (T,)
        row_ids = torch.tensor(rows, device=device)
        rows = torch.repeat_interleave(row_ids, torch.tensor(lens, device=device))                  # (T,)
        pos = torch.cat([torch.arange(n, device=device) for n in lens])                             # (T,)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)  # (B+1,)
        if self.rotary is not None and self.cfg.rope_type == "dynamic":
            cache.cos, cache.sin = self.rotary.table(cache.max_len, longest)
        cos, sin = (cache.cos[pos], cache.sin[pos]) if cache.cos is not None else (None, None)      # (T, D)

        def attend(i, q, k, v):                                                      # (T, H, D)
            q, k = self._rotate(q, k, cos, sin)
            cache.write(i, rows, pos, k, v)
            return fastllm.attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)

        h = self._run(tokens, pos, attend)[cu[1:].long() - 1]                        # (N, dim)
        cache.lengths[row_ids] = torch.tensor(lens, dtype=torch.int32, device=device)
        cache.longest = max(cache.longest, longest)
        return self.lm_head(h)

    def decode(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """tokens (B,) appended at each row's length; no host synchronisation, no allocation by value. With a
        PagedKVCache every row must hold a block for its next position (cache.reserve: a server reserves a
        request's prompt + max_tokens when it admits it; on the CPU check_room refuses a row past its blocks)."""
        cache.check_room(1)
        if self.rotary is not None and self.cfg.rope_type == "dynamic":
            cache.cos, cache.sin = self.rotary.table(cache.max_len, cache.longest + 1)
        after = cache.lengths + 1                                                    # (B,) int32
        h = self.embed(tokens[:, None], cache.lengths[:, None].long())               # (B, 1, dim)
        h = self.decode_hidden(h, cache, after)                                      # (B, 1, dim)
        cache.lengths.copy_(after)
        cache.longest += 1
        return self.lm_head(h)[:, 0]

    def decode_hidden(self, h: torch.Tensor, cache: StaticKVCache, after: torch.Tensor) -> torch.Tensor:
        """The blocks of a decode step: h (B, 1, dim) embedded at positions cache.lengths, whose rows will hold
        `after` (B,) positions -> the final normed hidden states (B, 1, dim), before lm_head; appends to the
        cache but leaves cache.lengths to the caller. For a Llama-family model with quantised linears on the CPU
        it calls only fastllm._C kernels, in an order that depends on no value: fastllm/runtime/cpu_graph.py
        records it once and replays it."""
        def attend(i, q, k, v):                                                      # (B, 1, H, D)
            ks, vs = cache.scales(i)
            q_rot = fastllm.kv_cache_append(cache.k[i], cache.v[i], k, v, cache.lengths, block_table=cache.block_table,
                                            k_scale=ks, v_scale=vs, cos=cache.cos, sin=cache.sin,
                                            q=q if cache.cos is not None else None)
            return fastllm.decode_attention(q if q_rot is None else q_rot, cache.k[i], cache.v[i], after,
                                            block_table=cache.block_table, k_scale=ks, v_scale=vs)

        with trusted_positions():  # the caller checked every row's next slot (cache.check_room)
            return self._layers(h, attend)                                           # (B, 1, dim)
