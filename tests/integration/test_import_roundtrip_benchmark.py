"""``benchmarks/import_roundtrip.py`` stays runnable (docs/method.md quotes its table): on the
tiny grid it prints every row, and the figures it prints meet what the import promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "import_roundtrip.py"


def test_the_round_trip_benchmark_prints_its_table(tmp_path: Path) -> None:
    env = {**os.environ, "SAP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line)
    rows = {name.strip(): value.strip() for name, value in rows.items()}
    assert float(rows["T1 correlation"]) >= 0.99
    assert float(rows["b1000 correlation at the DWI's resolution"]) >= 0.99
    assert all(
        float(v) == 0.0 for v in rows["largest lesion's centroid offset (voxels)"].split(", ")
    )
    scales = [float(v) for v in rows["b1000 station scale / centre's"].split(", ")]
    assert len(scales) == 5 and max(abs(s - 1) for s in scales) < 0.05
    assert float(rows["ADC largest error (10^-3 mm^2/s)"]) < 1e-3
    assert (tmp_path / "run" / "imported" / "manifests" / "pat1.json").is_file()
