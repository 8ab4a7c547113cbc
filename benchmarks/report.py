"""Turn a pytest-benchmark JSON run into benchmarks/results/<name>.json, one PNG plot per suite and
markdown tables.

    pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    python benchmarks/report.py run.json     # writes results/<name>.json and results/<name>-<suite>.png

A suite is a family of cases sharing a unit and peers (harness.compare's `suite`): "rowwise" (softmax,
layer_norm, rms_norm in GB/s against torch and torch.compile), "attention" (TFLOP/s against torch SDPA's
backends). The result file holds, per suite, the unit and how the work is counted, and per case
fastllm's rate, the peers' rates measured in the same run, the ratios (peer time / fastllm time: > 1
means fastllm is faster), the best peer, the reasons a peer could not run the case, and the device,
versions, commit and date of the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECT = "fastllm"
_DIRECTIONS = {"fwd": 0, "bwd": 1}  # the order of a suite's rows within an op (else the run's order)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _round(rate: float) -> float:
    return float(f"{rate:.4g}")


def _fmt(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"


def _is_subject(impl: str) -> bool:
    """fastllm, or one of its variants ("fastllm int4": bench_qmatmul times each format as its own case)."""
    return impl == SUBJECT or impl.startswith(SUBJECT + " ")


def summarise(run: dict) -> dict:
    """{"environment", "commit", "date", "suites": {suite: {"unit", "units", "impls", "cases": [row]}}};
    row = {"case", <case parameters>, "rates": {impl: rate}, "ratios": {peer: ratio}, "best_peer",
    "ratio_vs_best_peer", "unsupported": {peer: reason}} (the last four from the fastllm test)."""
    suites: dict[str, dict] = {}
    env = None
    for bench in run["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "suite" not in info:
            continue
        suite = suites.setdefault(info["suite"], {"unit": info["unit"], "units": f"{info['unit']} of {info['counted']}",
                                                  "impls": [], "cases": {}})
        row = suite["cases"].setdefault(bench["group"], {"case": bench["group"], **info["case"], "rates": {}})
        impls = [info["impl"], *info["peers"]]
        suite["impls"] += [i for i in impls if i not in suite["impls"]]
        row["rates"].setdefault(info["impl"], _round(info["rate"]))
        if not _is_subject(info["impl"]):
            continue
        # the peers timed inside the fastllm test, back to back with it, give the rates and the ratios
        row["ratios"], row["unsupported"] = {}, {}
        for peer, rec in info["peers"].items():
            if "unsupported" in rec:
                row["unsupported"][peer] = rec["unsupported"]
            else:
                row["rates"][peer] = _round(rec["rate"])
                row["ratios"][peer] = round(rec["ratio"], 3)
        if info.get("peak_bytes"):  # memory-recording suites (linear_cross_entropy, train)
            row["peak_bytes"] = info["peak_bytes"]
        row["best_peer"] = info["best_peer"]
        row["ratio_vs_best_peer"] = None if info["best_peer"] is None else round(info["ratio_vs_best_peer"], 3)
        env = env or info["environment"]
    if env is None:
        raise SystemExit("no fastllm cases with extra_info in this run (was it run with --benchmark-disable?)")
    for suite in suites.values():
        # impls: fastllm first, then the peers in the order the benchmarks name them
        suite["impls"].sort(key=lambda impl: not _is_subject(impl))
        suite["cases"] = sorted(suite["cases"].values(),
                                key=lambda r: (r.get("op", ""), _DIRECTIONS.get(r.get("direction"), len(_DIRECTIONS))))
    return {"environment": env, "commit": _commit(), "date": datetime.date.today().isoformat(), "suites": suites}


def _title(summary: dict) -> str:
    env = summary["environment"]
    name = env.get("cpu_model") or env["device_name"]
    return (f"{name} ({env['device']}, {env.get('cpu_threads')} threads), torch {env['torch']}, "
            f"triton {env['triton']}, commit {summary['commit']}, {summary['date']}")


def plot(summary: dict, name: str, path: Path) -> None:
    """Grouped bars of every implementation's rate per case, one panel per direction (fwd, bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = summary["suites"][name]
    directions = list(dict.fromkeys(c.get("direction", "") for c in suite["cases"]))
    impls = suite["impls"]
    most = max(sum(c.get("direction", "") == d for c in suite["cases"]) for d in directions)
    fig, axes = plt.subplots(len(directions), 1, figsize=(max(8, 0.12 * len(impls) * most + 2), 4.5 * len(directions)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, direction in zip(axes[:, 0], directions):
        cases = [c for c in suite["cases"] if c.get("direction", "") == direction]
        for i, impl in enumerate(impls):
            ax.bar([j + i * width for j in range(len(cases))], [c["rates"].get(impl, math.nan) for c in cases],
                   width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c["case"].replace(f"-{direction}-", "-", 1) for c in cases], rotation=75, ha="right",
                           fontsize=7)
        ax.set_ylabel(suite["unit"])
        ax.set_title(f"{name} {direction}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(_title(summary) + "\n(a missing bar: that implementation could not run the case)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict, name: str) -> str:
    """One suite as a README table: each implementation's rate, fastllm's ratio to each peer in
    parentheses (> 1: fastllm is faster), n/a where a peer could not run the case, and the reasons."""
    suite = summary["suites"][name]
    impls, unit = suite["impls"], suite["unit"]
    lines = [f"{name}, {suite['units']}; {_title(summary)}:", "",
             "| case | " + " | ".join(f"{i} {unit}" for i in impls) + " | vs best peer |",
             "|---" * (len(impls) + 2) + "|"]
    reasons: dict[tuple[str, str], list[str]] = {}
    for c in suite["cases"]:
        cells = [c["case"]]
        for impl in impls:
            if impl in c["rates"]:
                ratio = c.get("ratios", {}).get(impl)
                cells.append(_fmt(c["rates"][impl]) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
            else:
                cells.append("n/a")
                why = c.get("unsupported", {}).get(impl)
                if why:
                    reasons.setdefault((impl, why), []).append(c["case"])
        best = c.get("best_peer")
        cells.append(f"{c['ratio_vs_best_peer']:.2f}x ({best})" if best else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if reasons:
        lines += ["", "n/a:"]
        lines += [f"- {impl} ({len(cases)} cases, e.g. {cases[0]}): {why}" for (impl, why), cases in reasons.items()]
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
    for name, suite in summary["suites"].items():
        plot(summary, name, args.out_dir / f"{stem}-{name}.png")
        print(f"wrote {args.out_dir / stem}.json and {stem}-{name}.png ({len(suite['cases'])} {name} cases)")
    for name in summary["suites"]:
        print()
        print(markdown(summary, name))


if __name__ == "__main__":
    main()
