"""``benchmarks/bench_gpu.py --quick`` stays runnable on the CPU until a GPU runs it for real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"

pytestmark = pytest.mark.slow


def test_bench_gpu_quick_prints_every_phase_and_the_feed_ratio() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()}
    assert re.search(r"swin_unetr fs12 64\^3 batch 1 32-true\s+[0-9.]+ steps/s", rows["train"])
    assert re.search(r"1 workers, tiny grid, 32\^3.*\s[0-9.]+ patches/s", rows["loader"])
    # A volume of one window: the whole 64^3 probability map was produced and checked finite.
    assert re.search(r"64x64x64 volume.*\s[0-9.]+ s per volume\s+[0-9]+$", rows["inference"])
    rates = [float(m) for m in re.findall(r"([0-9.]+) (?:steps|patches)/s", result.stdout)]
    assert all(rate > 0 for rate in rates) and len(rates) == 3
    assert re.fullmatch(r"feed ratio: [0-9.]+x", lines[-1])
