"""pytest-benchmark harness shared by benchmarks/bench_*.py.

Each case (op, direction, shape, dtype) is timed for fastllm, torch eager and torch.compile; the
fastllm case also times both peers in the same run and records GB/s, the peers' GB/s and the
ratios, the device and the versions in extra_info. With --benchmark-disable every case runs once
(CI does that so the benchmarks cannot rot)."""
import pytest
import torch

from fastllm import _bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV = None


def params(op: str):
    return [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in _bench.cases(DEVICE, (op,))
            for impl in _bench.IMPLS]


def run_case(benchmark, case: _bench.Case, impl: str) -> None:
    global _ENV
    fn = _bench.synchronized(case.make(impl), DEVICE)
    benchmark.group = case.name
    if not benchmark.disabled:
        _bench.warm_up(fn)
    benchmark(fn)
    if benchmark.disabled:
        return
    _ENV = _ENV or _bench.environment(DEVICE)
    seconds = benchmark.stats.stats.median
    info = {"op": case.op, "direction": case.direction, "shape": list(case.shape),
            "dtype": str(case.dtype).replace("torch.", ""), "impl": impl, "bytes": case.bytes_moved,
            "gbps": _bench.gbps(case, seconds), **_ENV}
    if impl == "fastllm":
        for peer in ("torch", "torch.compile"):
            peer_s = _bench.time_it(_bench.synchronized(case.make(peer), DEVICE), DEVICE)
            info[f"{peer}_gbps"] = _bench.gbps(case, peer_s)
            info[f"ratio_vs_{peer}"] = peer_s / seconds
    benchmark.extra_info.update(info)
