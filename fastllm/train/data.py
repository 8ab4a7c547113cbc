"""Training data: a .txt or .jsonl file tokenised and packed into fixed-length blocks.

    .txt     the whole text, tokenised once
    .jsonl   one document per line: {"text": ...}, or {"messages": [{"role", "content"}, ...]} rendered with the
             tokenizer's chat template; each document ends with EOS
The token stream is cut into blocks of seq_len + 1 tokens that overlap by one (inputs block[:-1], targets
block[1:]), so every token but the first is a target exactly once; a shorter tail is dropped.
"""
from __future__ import annotations

import json
import os

import torch


def _documents(path: str, tokenizer, eos: int | None) -> list[list[int]]:
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    ids = tokenizer.encode(row["text"])
                elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                    text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=False)
                    ids = tokenizer.encode(text, add_special_tokens=False)
                else:
                    raise ValueError(f'{path}:{lineno} must be an object with "text" (a string) or "messages" '
                                     "(a list of {role, content})")
                docs.append(ids + ([eos] if eos is not None else []))
        return docs
    with open(path, encoding="utf-8") as f:
        return [tokenizer.encode(f.read())]


def load_blocks(path: str, tokenizer, seq_len: int, eos: int | None = None) -> torch.Tensor:
    """(num_blocks, seq_len + 1) int64 token blocks from a .txt or .jsonl file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    stream = torch.tensor([t for doc in _documents(path, tokenizer, eos) for t in doc], dtype=torch.long)
    n = (stream.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"{path} holds {stream.numel()} tokens, fewer than one block of seq_len + 1 = {seq_len + 1}")
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()
