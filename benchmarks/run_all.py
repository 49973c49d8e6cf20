"""Run every benchmark and print each ratio with its target in one table (``make bench``).

Each benchmark prints side-by-side figures against a named baseline and ends with
``<name> ratio: R.RRx`` lines; this runner streams each benchmark's output, collects those lines
and prints ``benchmark | ratio | value | target | met``. ``bench_gpu.py`` joins only where a
CUDA device is present (``make bench-gpu`` runs it on its own). The exit status is 1 when a
benchmark fails or a target is missed. The load average before and after is printed: on a
shared machine the figures move with it.

    python benchmarks/run_all.py [--only bench_loader bench_predict] [--no-fail]
"""

from __future__ import annotations

import argparse
import operator
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATIO_LINE = re.compile(r"^(?P<name>[a-z][a-z ]* ratio): (?P<value>[0-9.]+|n/a)x?\s*$")

TARGETS: dict[str, tuple[str, float] | None] = {
    "loader ratio": (">=", 5.0),
    "step ratio": ("<=", 1.05),
    "bf16 step ratio": ("<=", 0.85),
    "channels last step ratio": None,  # informative: model.channels_last over the usual layout
    "panoptica ratio": (">=", 3.0),
    "froc ratio": ("<=", 3.0),
    "predict ratio": ("<=", 1.10),
    "predict memory ratio": ("<", 2.0),
    "bf16 predict ratio": ("<=", 0.8),
    "threads ratio": ("<=", 1.10),
    "workers ratio": (">=", 1.10),
    "help budget ratio": ("<", 1.0),  # sap preprocess --help: median CPU s over its 1 s target
    "second preprocess budget ratio": ("<", 1.0),  # unchanged dataset: CPU s over 1.5 s
    "startup ratio": None,  # informative: first over second sap preprocess (wall)
    "feed ratio": (">=", 1.0),
}
"""Each ratio line a benchmark prints, with its target (``None``: reported, no target)."""

BENCHMARKS = [
    "bench_loader",
    "bench_step",
    "bench_metrics",
    "bench_predict",
    "bench_threads",
    "bench_startup",
]
COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run_benchmark(name: str) -> tuple[int, list[tuple[str, str]], float]:
    """Run one benchmark, echoing its output; its exit status, ratio lines and seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(HERE / f"{name}.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    ratios = []
    for line in process.stdout:
        print(line, end="", flush=True)
        match = RATIO_LINE.match(line.strip())
        if match:
            ratios.append((match["name"], match["value"]))
    return process.wait(), ratios, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="benchmark names (default: all)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 when a target is missed")
    args = parser.parse_args(argv)
    names = args.only or [*BENCHMARKS, *(["bench_gpu"] if _has_cuda() else [])]
    load_before = os.getloadavg()
    rows = []
    failed = False
    for name in names:
        print(f"== {name}", flush=True)
        status, ratios, seconds = run_benchmark(name)
        if status != 0:
            failed = True
            rows.append((name, "(failed)", f"exit {status}", "", "no", seconds))
        if not ratios and status == 0:
            failed = True
            rows.append((name, "(no ratio line)", "", "", "no", seconds))
        for ratio, value in ratios:
            target = TARGETS.get(ratio)
            if target is None:
                rows.append((name, ratio, f"{value}x", "-", "-", seconds))
                continue
            op, bound = target
            met = value != "n/a" and COMPARE[op](float(value), bound)
            failed |= not met
            shown = f"{value}x" if value != "n/a" else value
            rows.append((name, ratio, shown, f"{op} {bound:g}x", "yes" if met else "NO", seconds))
    load_after = os.getloadavg()
    header = ("benchmark", "ratio", "value", "target", "met")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print()
    print(
        f"load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )
    print(" | ".join(f"{h:<{w}}" for h, w in zip(header, widths)) + " | seconds")
    print("-|-".join("-" * w for w in widths) + "-|--------")
    for row in rows:
        cells = " | ".join(f"{c!s:<{w}}" for c, w in zip(row[:5], widths))
        print(f"{cells} | {row[5]:.0f}")
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
