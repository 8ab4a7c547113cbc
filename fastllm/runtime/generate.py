"""The generation loop: prefill the prompts into a static KV cache, then one decode step per new token.

Prompts of different lengths are not padded: row b of the cache holds its own tokens from slot 0 and its own
length (fastllm/runtime/kv_cache.py); prefill packs the prompts back to back (attention_varlen) and every decode
step appends one token to every row (kv_cache_append + decode_attention with per-row lengths), so a row sees
exactly the positions and keys it would see alone (batched output equals one-by-one output).

    token_steps(...)  yields (B,) tensors of new tokens, one per decode step (prefill gives the first)
    TextStream        turns one row's tokens into text increments: incremental detokenisation, stop strings
"""
from __future__ import annotations

from typing import Iterator

import torch

from .graphs import decode_stepper
from .inputs import token_ids
from .sampling import SamplingParams, sample


def check_prompts(prompts, max_seq_len: int, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of Python ints, checked: a non-empty list of non-empty lists of token ids in
    [0, vocab_size), each shorter than max_seq_len."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of lists of token ids, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    prompts = [token_ids(p, vocab_size, f"prompts[{i}]") for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (no tokens); give some text")
        if len(p) >= max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, which does not leave room for a new token in "
                             f"the model's context of {max_seq_len} tokens")
    return prompts


def token_steps(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                eos_ids: tuple[int, ...] = (), finished: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,) int64 on the model's device, up to max_new_tokens times
    (fewer when the context max_seq_len is reached). A row is finished once it produced an EOS id or the
    caller set `finished[i]` (a (B,) bool tensor it passed in, e.g. on a stop string); the loop ends when
    every row is finished. Finished rows keep being computed (the batch stays rectangular); their tokens
    are to be ignored."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    cfg = model.cfg
    prompts = check_prompts(prompts, cfg.max_seq_len, cfg.vocab_size)
    device = model.tok_embeddings.weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - longest)
    if max_new_tokens <= 0:
        return
    cache = model.new_cache(b, longest + max_new_tokens)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    counts = torch.zeros(b, cfg.vocab_size, dtype=torch.int32, device=device) if params.counts_tokens else None
    if finished is None:
        finished = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = params.generator(device)
    logits = model.prefill(prompts, cache)                                                   # (B, V)
    decode = decode_stepper(model, cache) if max_new_tokens > 1 else None                    # CUDA or CPU graph
    for step in range(max_new_tokens):
        nxt = sample(logits.float(), params, seen, generator, counts)                        # (B,)
        yield nxt
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        if counts is not None:
            counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=counts.dtype))
        logits = decode(nxt)                                                                 # (B, V)


class TextStream:
    """One row's generated text, growing token by token.

    push(token) returns the text that became final: the decoded text of all tokens so far, minus what was
    returned before, holding back (a) an incomplete UTF-8 character (decodes to U+FFFD) and (b) any tail
    that could be the start of a stop string. On a stop string the text is cut before it and `stopped` is
    set; finish() returns whatever was held back at the end."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""        # text returned so far
        self.stopped = False

    def _held_back(self, full: str) -> int:
        """Length of the longest tail of `full` that is a proper prefix of a stop string."""
        for n in range(min(len(full), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(full[-n:]) for s in self.stop):
                return n
        return 0

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            new, self.text = full[len(self.text):cut], full[:cut]
            return new
        if full.endswith("\ufffd"):
            return ""
        end = len(full) - self._held_back(full)
        new = full[len(self.text):end] if end > len(self.text) else ""
        self.text += new
        return new

    def finish(self) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids)
        new, self.text = full[len(self.text):], full
        return new
