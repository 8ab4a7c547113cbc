"""Turn a pytest-benchmark JSON run into benchmarks/results/<device>.json and a PNG plot.

    pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    python benchmarks/report.py run.json            # writes results/<device>.json and .png

The result file holds, per case, fastllm's GB/s, the peers' GB/s measured in the same run, the
ratios, and the device, versions, commit and date of the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(run: dict) -> dict:
    rows = {}
    env = None
    for bench in run["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "gbps" not in info:
            continue
        key = bench["group"]
        row = rows.setdefault(key, {"case": key, "op": info["op"], "direction": info["direction"],
                                    "shape": info["shape"], "dtype": info["dtype"], "gbps": {}})
        row["gbps"].setdefault(info["impl"], round(info["gbps"], 2))
        if info["impl"] == "fastllm":
            # the peers timed inside the fastllm case, back to back with it, give the ratios
            row["gbps"]["torch"] = round(info["torch_gbps"], 2)
            row["gbps"]["torch.compile"] = round(info["torch.compile_gbps"], 2)
            row["ratio_vs_torch"] = round(info["ratio_vs_torch"], 3)
            row["ratio_vs_torch.compile"] = round(info["ratio_vs_torch.compile"], 3)
            env = env or {k: info[k] for k in ("device", "device_name", "torch", "triton", "fastllm", "python",
                                                "cpu_threads", "backends") if k in info}
    if env is None:
        raise SystemExit("no fastllm cases with extra_info in this run (was it run with --benchmark-disable?)")
    return {"environment": env, "commit": _commit(), "date": datetime.date.today().isoformat(),
            "units": "GB/s of bytes moved (inputs read once, outputs written once)",
            "cases": sorted(rows.values(), key=lambda r: (r["op"], r["direction"], r["shape"], r["dtype"]))}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = summary["cases"]
    impls = ["fastllm", "torch", "torch.compile"]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cases)), 5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ax.bar([j + i * width for j in range(len(cases))], [c["gbps"].get(impl, 0) for c in cases], width,
               label=impl)
    ax.set_xticks([j + width for j in range(len(cases))])
    ax.set_xticklabels([c["case"] for c in cases], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("GB/s")
    env = summary["environment"]
    ax.set_title(f"{env['device_name']} - torch {env['torch']}, triton {env['triton']} - {summary['commit']} "
                 f"{summary['date']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    """The summary as a README table: GB/s per implementation and fastllm's ratios."""
    env = summary["environment"]
    lines = [f"{env['device_name']} ({env['device']}, {env.get('cpu_threads')} threads), torch {env['torch']}, "
             f"triton {env['triton']}, commit {summary['commit']}, {summary['date']}:", "",
             "| case | fastllm GB/s | torch GB/s | torch.compile GB/s | vs torch | vs compile |",
             "|---|---|---|---|---|---|"]
    for c in summary["cases"]:
        g = c["gbps"]
        lines.append(f"| {c['case']} | {g.get('fastllm', 0):.1f} | {g.get('torch', 0):.1f} | "
                     f"{g.get('torch.compile', 0):.1f} | {c['ratio_vs_torch']:.2f}x | "
                     f"{c['ratio_vs_torch.compile']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_json", type=Path)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="result file stem (default: derived from the device name)")
    args = parser.parse_args(argv)
    summary = summarise(json.loads(args.run_json.read_text()))
    stem = args.name or re.sub(r"[^a-z0-9]+", "-", summary["environment"]["device_name"].lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.json and .png ({len(summary['cases'])} cases)")
    print(markdown(summary))


if __name__ == "__main__":
    main()
