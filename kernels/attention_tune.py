"""Per-GPU tile tuning of the attention kernels, with the winners cached per architecture.

    python -m fastllm.kernels.attention_tune            # tune on the current GPU, write the user cache
    python -m fastllm.kernels.attention_tune --print    # show what pick_config will use here

For each kernel ("fwd", "dkdv", "dq"), padded head dim (64, 128, 256) and precision ("half": fp16/bf16, or
"fp32") every candidate tile (CANDIDATES) runs a representative problem (TUNE_SHAPE); candidates the
compiler rejects (shared memory, registers) or whose result differs from the default tile's beyond rounding
are dropped, and the fastest is kept. Winners are looked up by key "sm<major><minor>/<kernel>/<dim>/<precision>":
first in the user cache ($FASTLLM_CACHE_DIR or ~/.cache/fastllm, attention_tiles.json), then in the table
shipped with the package (attention_tiles.json next to this file, filled from GPU sessions), else
_attn_common.CONFIGS. A cache that cannot be read is ignored with a warning. The problem is causal, with no mask
and no dropout: a float mask or dropout needs more shared memory, and where a winner's tiles do not fit those,
the launch shrinks them for that variant (_attn_common.run_fitting, with a warning).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import time
import warnings
from pathlib import Path

import torch

from ._attn_common import CONFIGS, AttnConfig

CANDIDATES = [AttnConfig(m, n, w, s) for m, n, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]
"""Tiles tried per (kernel, dim, precision): 54, about a minute per key on an H100."""
TUNE_SHAPE = (4, 16, 2048)
"""(B, H, L) of the problem each candidate runs, causal (the common training and prefill case)."""
SHIPPED = Path(__file__).with_name("attention_tiles.json")


def user_cache() -> Path:
    root = os.environ.get("FASTLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastllm")
    return Path(root) / "attention_tiles.json"


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def key(arch_name: str, kernel: str, dim: int, fp32: bool) -> str:
    return f"{arch_name}/{kernel}/{dim}/{'fp32' if fp32 else 'half'}"


def _read(path: Path) -> dict[str, AttnConfig]:
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {k: AttnConfig(*map(int, v)) for k, v in raw.items()}
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"fastllm: ignoring the attention tile cache {path}: {e}", stacklevel=3)
        return {}


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, AttnConfig]:
    return {**_read(SHIPPED), **_read(user_cache())}


def lookup(arch_name: str, kernel: str, dim: int, fp32: bool) -> AttnConfig | None:
    return _table().get(key(arch_name, kernel, dim, fp32))


def tuned_config(device: torch.device, kernel: str, dim: int, fp32: bool) -> AttnConfig | None:
    """The cached winner for this GPU's architecture, or None (pick_config then uses CONFIGS)."""
    return lookup(arch(device), kernel, dim, fp32)


# ---- tuning ------------------------------------------------------------------------------------
def _problem(dim: int, dtype: torch.dtype, device, shape):
    b, h, l = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn((b, h, l, dim), generator=g, device=device, dtype=dtype) for _ in range(4))
    return q, k, v, do


def _runner(kernel: str, q, k, v, do, cfg: AttnConfig):
    """A no-argument callable running `kernel` alone with tiles cfg, and returning the tensor it computes."""
    from .attention_bwd import attention_bwd
    from .attention_fwd import attention_fwd

    scale = q.shape[-1] ** -0.5
    out, lse = attention_fwd(q, k, v, scale=scale, is_causal=True)
    if kernel == "fwd":
        return lambda: attention_fwd(q, k, v, scale=scale, is_causal=True, config=cfg)[0]
    pick = 1 if kernel == "dkdv" else 0  # dq: the deterministic dq kernel (the fast mode's dq rides on dkdv)
    return lambda: attention_bwd(do, None, q, k, v, None, out, lse, scale=scale, is_causal=True, config=cfg,
                                 deterministic=True)[pick]


def _seconds(fn, device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=reps) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tune(device, dims=(64, 128, 256), precisions=("half", "fp32"), kernels=("fwd", "dkdv", "dq"),
         candidates=None, shape=TUNE_SHAPE, reps: int = 25, log=print) -> dict[str, AttnConfig]:
    """Time every candidate tile on `device` and return {key: winner}; see the module docstring."""
    device = torch.device(device)
    arch_name = arch(device) if device.type == "cuda" else "interpreter"
    winners = {}
    for dim, prec, kernel in itertools.product(dims, precisions, kernels):
        dtype = torch.float32 if prec == "fp32" else torch.bfloat16
        q, k, v, do = _problem(dim, dtype, device, shape)
        default = CONFIGS[(dim, prec == "fp32")][kernel]
        expected = _runner(kernel, q, k, v, do, default)()
        tol = 1e-4 if prec == "fp32" else 2e-2
        best = None
        for cfg in candidates or CANDIDATES:
            try:
                fn = _runner(kernel, q, k, v, do, cfg)
                got = fn()
            except Exception as e:  # the compiler rejects tiles that do not fit: skip them
                log(f"  {kernel} D={dim} {prec} {cfg}: skipped ({type(e).__name__})")
                continue
            if not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol):
                log(f"  {kernel} D={dim} {prec} {cfg}: result differs from the default tile's; dropped")
                continue
            t = _seconds(fn, device, reps)
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is not None:
            winners[key(arch_name, kernel, dim, prec == "fp32")] = best[1]
            log(f"{kernel} D={dim} {prec}: {best[1]} ({best[0] * 1e3:.3f} ms)")
    return winners


def save(winners: dict[str, AttnConfig], path: Path | None = None) -> Path:
    """Merge winners into the user cache (or `path`) and forget the in-process table."""
    path = path or user_cache()
    table = {k: list(c.__dict__.values()) for k, c in {**_read(path), **winners}.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    _table.cache_clear()
    return path


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--print", action="store_true", help="show the tiles pick_config uses on this GPU")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_tune needs a CUDA GPU")
    dev = torch.device("cuda")
    if args.print:
        from ._attn_common import pick_config

        for dim, fp32, kernel in itertools.product(args.dims, (False, True), ("fwd", "dkdv", "dq")):
            print(key(arch(dev), kernel, dim, fp32), pick_config(kernel, dim, dim, torch.float32 if fp32 else
                                                                 torch.bfloat16, dev))
        return
    print("wrote", save(tune(dev, dims=tuple(args.dims))))


if __name__ == "__main__":
    main()
