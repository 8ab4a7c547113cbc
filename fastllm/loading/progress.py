"""A progress bar over the tensors being loaded: tqdm on a terminal (it comes with transformers and most
environments), nothing when tqdm is missing, stderr is not a terminal, or FASTLLM_PROGRESS=0."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, desc: str) -> Iterable[T]:
    if os.environ.get("FASTLLM_PROGRESS", "1") == "0" or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False)
