"""pytest-benchmark harness shared by benchmarks/bench_*.py.

`compare` is the one timing-and-recording step every benchmark uses: pytest-benchmark times the
subject (usually fastllm), `_bench.time_it` times each named peer in the same test right after it,
and benchmark.extra_info records the work per call, every rate in the case's unit, the ratios, the
best peer, the device and the versions. A peer that cannot run a case (torch refuses it, it would not
fit in memory) is recorded as unsupported with the reason, and the run goes on. With
--benchmark-disable (CI) the subject and every peer run once, unrecorded, so the benchmarks cannot rot.

`run_case`: the row-wise ops of fastllm._bench (softmax, layer_norm, rms_norm) in GB/s, one test per
implementation (fastllm, torch, torch.compile); the fastllm test also times the other two as peers.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from typing import Callable, ContextManager

import pytest
import torch

from fastllm import _bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tok/s": 1, "req/s": 1}
"""The units a rate can be recorded in, and how much work (bytes, FLOPs, tokens, requests) one of each is per
second."""

Peer = Callable[[], ContextManager[Callable[[], object]]]
"""A peer: called once, it gives a context manager that sets the peer up (tensors, backend flags), yields
the no-argument callable to time, and tears the set-up down afterwards."""


class Unsupported(Exception):
    """Raised by a peer's set-up when it cannot run the case; the message is recorded as the reason."""


@functools.lru_cache(maxsize=None)
def _environment() -> dict:
    return _bench.environment(DEVICE)


def _reason(exc: BaseException, caught: list) -> str:
    """The exception and the warnings raised with it (torch's SDPA says why a backend refused a case in
    warnings, before its RuntimeError), without torch's "(Triggered internally at file:line)" tails."""
    notes = [f"{type(exc).__name__}: {exc}"] + [str(w.message) for w in caught]
    notes = [n.split(" (Triggered internally at")[0].strip() for n in notes]
    return "; ".join(dict.fromkeys(notes))


def _run_peer(make: Peer, timer: Callable[[Callable], float | None]) -> dict:
    """{"seconds": timer(fn)} for the peer's fn, or {"unsupported": reason} when it cannot run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with make() as fn:
                return {"seconds": timer(_bench.synchronized(fn, DEVICE))}
        except (Unsupported, RuntimeError) as exc:  # torch's refusals and out-of-memory are RuntimeErrors
            return {"unsupported": _reason(exc, caught)}


def compare(benchmark, fn: Callable[[], object], peers: dict[str, Peer], *, group: str, suite: str, case: dict,
            work: float, unit: str, counted: str, impl: str = "fastllm", min_time: float = 0.2,
            warm_up_time: float = 0.3, warm_up_calls: int = 3) -> None:
    """Time fn (implementation `impl`) with pytest-benchmark and each peer with _bench.time_it, and record

        extra_info = {"suite", "case", "impl", "unit", "counted", "work", "seconds", "rate",
                      "peers": {name: {"seconds", "rate", "ratio"} or {"unsupported": reason}},
                      "best_peer", "ratio_vs_best_peer", "environment"}

    work: what one call does, in the unit's base (bytes for GB/s, FLOPs for TFLOP/s, tokens for tok/s); counted: how it is
    counted, in words; rate = work / seconds / UNITS[unit]; ratio = peer seconds / fn seconds (> 1: fn is
    faster); the best peer is the fastest that ran. suite and group name the report's table and row; case
    holds the case's parameters (op, direction, shape, dtype, ...). fn's seconds are pytest-benchmark's
    median (its rounds are set by the command line or a pytest.mark.benchmark marker), the peers' are
    time_it's (min_time and warm_up_time seconds each). Every callable is timed with a device
    synchronisation after it.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    fn = _bench.synchronized(fn, DEVICE)
    benchmark.group = group
    if benchmark.disabled:
        benchmark(fn)
        for make in peers.values():
            _run_peer(make, lambda f: f())
        return
    _bench.warm_up(fn, calls=warm_up_calls, min_time=warm_up_time)
    benchmark(fn)
    seconds = benchmark.stats.stats.median
    per_unit = UNITS[unit]
    timed = {}
    for name, make in peers.items():
        timed[name] = _run_peer(make, lambda f: _bench.time_it(f, DEVICE, min_time=min_time,
                                                                 warm_up_time=warm_up_time,
                                                                 warm_up_calls=warm_up_calls))
        if "seconds" in timed[name]:
            peer_s = timed[name]["seconds"]
            timed[name].update(rate=work / peer_s / per_unit, ratio=peer_s / seconds)
    ran = [name for name in timed if "seconds" in timed[name]]
    best = min(ran, key=lambda name: timed[name]["seconds"], default=None)
    benchmark.extra_info.update({
        "suite": suite, "case": case, "impl": impl, "unit": unit, "counted": counted, "work": work,
        "seconds": seconds, "rate": work / seconds / per_unit, "peers": timed, "best_peer": best,
        "ratio_vs_best_peer": timed[best]["ratio"] if best else None, "environment": _environment()})


def peak_bytes(run: Callable[[], object]) -> int | None:
    """Peak memory of one call of run above what was in use before it. CUDA: the caching allocator's peak. CPU
    (Linux with glibc): the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its
    resident set before the call, with glibc's mmap threshold pinned low during the call so that every large
    tensor is mapped and unmapped on its own (malloc's heap caching would otherwise hide or inflate a peak);
    None where neither applies. Call it after the timing: it runs `run` once more."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = _glibc()
    if libc is None:
        return None
    gc.collect()
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        return None
    if libc.mallopt(M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD) != 1:  # mallopt returns 1 on success
        return None
    try:
        base = _status_bytes("VmRSS")
        run()
        return _status_bytes("VmHWM") - base
    finally:  # what glibc's dynamic thresholds settle at once large blocks have been freed: later timings as before
        libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
PINNED_MMAP_THRESHOLD = 1 << 17   # glibc's initial threshold: every block from 128 KiB has its own mapping
SETTLED_MMAP_THRESHOLD = 1 << 25  # the most glibc's dynamic threshold rises to (32 MiB on 64-bit)


@functools.lru_cache(maxsize=None)
def _glibc():
    """glibc through ctypes, or None (not Linux, or no glibc)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"
    raise RuntimeError(f"no {key} in /proc/self/status")


# ---- the row-wise ops (softmax, layer_norm, rms_norm) ------------------------------------------
def params(op: str):
    return [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in _bench.cases(DEVICE, (op,))
            for impl in _bench.IMPLS]


def run_case(benchmark, case: _bench.Case, impl: str) -> None:
    """One implementation of a row-wise case in GB/s; the fastllm case times torch and torch.compile too."""
    def peer(name: str) -> Peer:
        return lambda: contextlib.nullcontext(case.make(name))

    peers = {name: peer(name) for name in _bench.IMPLS if name != impl} if impl == "fastllm" else {}
    compare(benchmark, case.make(impl), peers, group=case.name, suite="rowwise", impl=impl,
            case={"op": case.op, "direction": case.direction, "shape": list(case.shape),
                  "dtype": str(case.dtype).replace("torch.", "")},
            work=case.bytes_moved, unit="GB/s", counted="bytes moved (inputs read once, outputs written once)",
            warm_up_calls=20)  # (past the first touches of fresh memory, see _bench.warm_up)
