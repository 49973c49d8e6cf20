"""``benchmarks/bench_gpu.py``: ``--quick`` stays runnable on the CPU until a GPU runs it for real
(every row, the feed ratio), and without CUDA the full sizes are refused in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
ROWS = ("train (memory)", "train (loader)", "bf16-mixed", "channels_last_3d", "tf32",
        "torch.compile", "inference")  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=240, env=env)  # fmt: skip


def test_without_cuda_the_full_sizes_are_refused_in_one_line() -> None:
    result = _run()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "bench_gpu: error: no CUDA device (cpu): the full sizes are a GPU's; run on a GPU node "
        "(make bench-gpu) or pass --quick for the CPU smoke run"
    )
    assert result.stdout == ""


@pytest.mark.slow
def test_quick_prints_every_row_and_the_feed_ratio() -> None:
    result = _run("--quick", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU (cpu); torch ") and "precision 32-true" in lines[0]
    rows = {row: line for line in lines for row in ROWS if line.startswith(row + " ")}
    assert set(rows) == set(ROWS)
    rate = r"\s+([0-9.e-]+) steps/s"
    memory = float(re.search(rate, rows["train (memory)"]).group(1))
    loader = float(re.search(rate, rows["train (loader)"]).group(1))
    assert "unet_tiny 32^3 batch 2 32-true, training loader, 1 workers" in rows["train (loader)"]
    assert "skipped: TF32 is a CUDA feature" in rows["tf32"]
    assert "skipped: --quick on the CPU" in rows["torch.compile"]
    assert re.search(rf"{rate} \([0-9.]+x\)", rows["channels_last_3d"])
    assert re.search(r"skipped: no bfloat16|steps/s", rows["bf16-mixed"])
    assert re.search(r"64x64x64 volume.* [0-9.]+ s per volume\s+-\s+[0-9]+$", rows["inference"])
    ratio = float(re.fullmatch(r"feed ratio: ([0-9.]+)x \(.*\)", lines[-1]).group(1))
    assert ratio == pytest.approx(loader / memory, rel=0.02, abs=0.01)
