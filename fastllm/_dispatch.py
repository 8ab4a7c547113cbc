"""The one place that chooses which backend runs an op.

For each op and device type there is an ordered list of candidate backends. The first that is
available (fastllm._backend.why_not) and supports the call (dtype, weight dtypes) wins; for every
faster candidate that was passed over the reason is recorded, and `fastllm.dispatch_log()` shows
the latest decision per op. `fastllm.use_backend(name)` forces a backend (tests use it to run the
Triton kernels on CPU under TRITON_INTERPRET=1); forcing one that cannot run the call is an error.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from . import _backend

# op -> device type -> candidates, fastest first. "torch" (the reference) always closes the list.
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "softmax": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "layer_norm": {"cuda": ("cuda", "torch"), "cpu": ("cpu", "torch")},
    "rms_norm": {"cuda": ("cuda", "torch"), "cpu": ("cpu", "torch")},
    "silu_mul": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "attention": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "attention_varlen": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "decode_attention": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "kv_cache_append": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "qmatmul": {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")},
    "linear_cross_entropy": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
}
# Backends that can be forced for an op beyond its preference list (Triton on CPU, for tests).
FORCIBLE: dict[str, tuple[str, ...]] = {op: ("triton",) for op in ("softmax", "silu_mul", "attention",
                                                             "attention_varlen", "decode_attention", "kv_cache_append",
                                                             "linear_cross_entropy", "qmatmul")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastllm_forced_backend", default=None)


@dataclass
class Decision:
    backend: str
    skipped: dict[str, str] = field(default_factory=dict)


_log: dict[str, Decision] = {}


def _unsupported(tensors: tuple[torch.Tensor | None, ...]) -> str | None:
    """Why the kernels cannot take these tensors (dtype rules shared by every kernel), or None."""
    x = tensors[0]
    if x.dtype not in _backend.KERNEL_DTYPES:
        return f"dtype {x.dtype} has no kernel (float32, float16, bfloat16 do)"
    for t in tensors[1:]:
        if t is not None and t.dtype != x.dtype:
            return f"mixed dtypes ({x.dtype} input, {t.dtype} parameter)"
    return None


_NO_SKIPS: dict[str, str] = {}


def _record(op: str, backend: str, skipped: dict[str, str]) -> None:
    """Log the decision, keeping the logged object when it is the same (selection runs on every call)."""
    last = _log.get(op)
    if last is None or last.backend != backend or last.skipped != skipped:
        _log[op] = Decision(backend, dict(skipped))


def select(op: str, *tensors: torch.Tensor | None, limits: dict[str, str | None] | None = None) -> str:
    """Name of the backend that runs `op` on these tensors (the first is the main input).
    limits: {backend: why it cannot take this call, or None}, for an op's own limits (shapes, modes)."""
    device_type = tensors[0].device.type
    forced = _forced.get()
    if forced is not None:
        allowed = PREFERENCE[op].get(device_type, ("torch",)) + FORCIBLE.get(op, ())
        reason = None if forced in allowed else f"{op} has no {forced} path"
        if reason is None and forced != "torch":
            reason = _backend.why_not_on(forced, device_type) or _unsupported(tensors) or (limits or {}).get(forced)
        if reason is not None:
            raise ValueError(f"backend {forced!r} was forced for {op} on {device_type}, but {reason}")
        _record(op, forced, {"(forced)": f"use_backend({forced!r})"})
        return forced
    skipped = _NO_SKIPS
    candidates = PREFERENCE[op].get(device_type)
    for name in candidates or ("torch",):
        if name == "torch":
            break
        reason = (_backend.why_not_on(name, device_type) or _unsupported(tensors)
                  or (limits.get(name) if limits else None))
        if reason is None:
            _record(op, name, skipped)
            return name
        if skipped is _NO_SKIPS:
            skipped = {}
        skipped[name] = reason
    if candidates is None:
        skipped = {**skipped, device_type: f"no fastllm kernel for {device_type} tensors"}
    _record(op, "torch", skipped)
    return "torch"


@contextlib.contextmanager
def use_backend(name: str):
    """Force every fastllm op in this context to run on backend `name`
    ("cuda", "triton", "cpu" or "torch"); an op that cannot run there raises ValueError."""
    if name not in ("cuda", "triton", "cpu", "torch"):
        raise ValueError(f"name must be one of 'cuda', 'triton', 'cpu', 'torch', got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def dispatch_log() -> dict[str, dict]:
    """Latest decision per op: {op: {"backend": name, "skipped": {faster backend: why not taken}}}."""
    return {op: {"backend": d.backend, "skipped": dict(d.skipped)} for op, d in _log.items()}
