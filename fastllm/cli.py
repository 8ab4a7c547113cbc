"""The `fastllm` command. `fastllm bench` times each op against torch on this machine's device and
prints GB/s and the ratios (the runtime's generate/chat/serve commands come with the runtime)."""
from __future__ import annotations

import argparse
import sys

import torch


def _bench(args) -> int:
    from . import _bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.ops.split(",") if args.ops else _bench.OPS
    unknown = [o for o in ops if o not in _bench.OPS]
    if unknown:
        print(f"fastllm bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(_bench.OPS)}",
              file=sys.stderr)
        return 2
    impls = ("fastllm", "torch") if args.no_compile else _bench.IMPLS
    env = _bench.environment(device)
    print(f"# {env['device_name']} ({device}), torch {env['torch']}, triton {env['triton']}, "
          f"threads {env['cpu_threads']}")
    header = f"{'case':<34}" + "".join(f"{i + ' GB/s':>20}" for i in impls) + f"{'vs torch':>10}"
    if "torch.compile" in impls:
        header += f"{'vs compile':>12}"
    print(header)
    for case in _bench.cases(device, ops):
        rates = {}
        for impl in impls:
            fn = _bench.synchronized(case.make(impl), device)
            rates[impl] = _bench.gbps(case, _bench.time_it(fn, device, min_time=args.min_time))
        line = f"{case.name:<34}" + "".join(f"{rates[i]:>20.1f}" for i in impls)
        line += f"{rates['fastllm'] / rates['torch']:>9.2f}x"
        if "torch.compile" in impls:
            line += f"{rates['fastllm'] / rates['torch.compile']:>11.2f}x"
        print(line, flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time fastllm's ops against torch on this device")
    bench.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--ops", help="comma-separated subset of softmax,layer_norm,rms_norm")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    bench.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per case and peer")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
