"""Start-up cost of the data commands: ``sap preprocess --help`` and ``sap preprocess`` run twice.

Every command runs as the user runs it, in a fresh interpreter (``python -m sap_lightning``),
so the figures include the interpreter and every import. Side by side, CPU time (user + sys of
the child, the figure that does not move when other processes share the CPUs) and wall time:

- **python**: an interpreter that runs nothing (the floor under every command);
- **import torch**: for reference, what any command that imports torch pays before it starts;
- **preprocess --help**: argument parsing only (target: under ``HELP_TARGET_S`` of CPU);
- **first preprocess**: a generated dataset checked voxel by voxel and cached (once);
- **second preprocess**: the same unchanged dataset again: every case is skipped and the check
  only stats files and hashes their headers (``dataset/check_cache.py``), so nearly all of it is
  start-up (target: under ``SECOND_TARGET_S`` of CPU).

The cohort is synthetic (``make_phantom_cohort``, 6 patients at the ``medium`` grid, 128 x 128 x
256 voxels, by default). Files modified less than ``RACY_MARGIN_NS`` before a check are not
remembered (coarse file-system timestamps), so the benchmark waits that long after writing the
cohort, as any dataset copied in earlier would be. Each repeated figure is given as best and
median of ``--repeats`` runs; a target is met when the median is under it. The last lines are
``help budget ratio``, ``second preprocess budget ratio`` (median CPU seconds over the target:
below 1.00x meets it) and ``startup ratio`` (first over second preprocess, wall time;
informative).

Usage: ``python benchmarks/bench_startup.py [--patients 6] [--size medium] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sap_lightning.dataset.check_cache import CACHE_DIR_ENV, RACY_MARGIN_NS
from sap_lightning.synthetic import SIZES, make_phantom_cohort

HELP_TARGET_S = 1.0
"""``sap preprocess --help`` must cost less CPU than this (issue 30)."""
SECOND_TARGET_S = 1.5
"""A second ``sap preprocess`` of an unchanged dataset must cost less CPU than this (issue 30)."""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """``(cpu seconds, wall seconds, stdout)`` of one child process; it must succeed."""
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return cpu, wall, done.stdout


def _repeated(
    argv: list[str], env: dict[str, str], repeats: int, expect: str = ""
) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of ``repeats`` runs, each of which must print ``expect``."""
    runs = [_timed(argv, env) for _ in range(repeats)]
    for _, _, out in runs:
        assert expect in out, f"{' '.join(argv)} printed {out!r}, not {expect!r}"
    return [cpu for cpu, _, _ in runs], [wall for _, wall, _ in runs]


def _row(name: str, cpu: list[float], wall: list[float], target: float | None = None) -> str:
    """``name | cpu best / median | wall best / median | target``."""
    figures = (
        f"{min(cpu):6.2f} {statistics.median(cpu):6.2f}   {min(wall):6.2f} "
        f"{statistics.median(wall):6.2f}"
    )
    if target is None:
        return f"{name:<20}{figures}   -"
    met = "met" if statistics.median(cpu) < target else "MISSED"
    return f"{name:<20}{figures}   < {target:g} s CPU: {met}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="medium", help="phantom grid preset (voxels)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each repeated figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sap = [sys.executable, "-m", "sap_lightning"]

    shape, spacing = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        # The children remember dataset checks here, not in the user's cache.
        env = {**os.environ, CACHE_DIR_ENV: str(Path(tmp) / "checks")}
        start = time.perf_counter()
        cohort = make_phantom_cohort(
            Path(tmp) / "phantoms", n_healthy=1, n_patients=args.patients, seed=args.seed,
            shape=shape, spacing=spacing,
        )  # fmt: skip
        generated = time.perf_counter() - start
        dataset = cohort.lesion
        files = sum(1 for p in dataset.rglob("*.nii.gz"))
        megabytes = sum(p.stat().st_size for p in dataset.rglob("*.nii.gz")) / 1e6
        print(
            f"cohort: {args.patients} patients of {shape} voxels, {files} files, "
            f"{megabytes:.0f} MB .nii.gz (generated in {generated:.1f} s); "
            f"{args.repeats} runs per repeated figure; load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs"
        )
        time.sleep(RACY_MARGIN_NS / 1e9)  # files just written are not remembered

        floor = _repeated([sys.executable, "-c", "pass"], env, args.repeats)
        torch = _repeated([sys.executable, "-c", "import torch"], env, args.repeats)
        help_ = _repeated([*sap, "preprocess", "--help"], env, args.repeats, "usage: sap")
        first_cpu, first_wall, out = _timed([*sap, "preprocess", str(dataset)], env)
        assert f"{args.patients} cases written" in out, out
        unchanged = f"0 cases written, {args.patients} up to date"
        second = _repeated([*sap, "preprocess", str(dataset)], env, args.repeats, unchanged)

    print()
    print(f"{'seconds':<20}{'CPU best median':>20}{'wall best median':>20}   target")
    print(_row("python (nothing)", *floor))
    print(_row("import torch", *torch))
    print(_row("preprocess --help", *help_, HELP_TARGET_S))
    print(_row("first preprocess", [first_cpu], [first_wall]))
    print(_row("second preprocess", *second, SECOND_TARGET_S))
    print()
    print(f"median CPU over the target ({HELP_TARGET_S:g} s; {SECOND_TARGET_S:g} s):")
    print(f"help budget ratio: {statistics.median(help_[0]) / HELP_TARGET_S:.2f}x")
    print(f"second preprocess budget ratio: {statistics.median(second[0]) / SECOND_TARGET_S:.2f}x")
    print(f"startup ratio: {first_wall / statistics.median(second[1]):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
