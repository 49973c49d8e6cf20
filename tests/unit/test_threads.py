"""Thread pools sized to the CPUs a process may use: affinity mask and cgroup quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sap_lightning.core.threads import configure_threads, usable_cpus


def _cgroup(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def test_a_cgroup_quota_caps_the_affinity_mask(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path, "max 100000")) == affinity
    assert usable_cpus(_cgroup(tmp_path, "100000 100000")) == 1
    assert usable_cpus(_cgroup(tmp_path, "50000 100000")) == 1  # half a CPU still gets one
    assert usable_cpus(_cgroup(tmp_path, f"{100000 * (affinity + 4)} 100000")) == affinity


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_a_process_pinned_to_one_cpu_runs_one_torch_thread() -> None:
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from sap_lightning.core.threads import configure_threads; import torch; "
        "print(configure_threads(), torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SAP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_the_environment_overrides_the_detected_count(monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SAP_NUM_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        assert configure_threads(requested=2) == 2
    finally:
        torch.set_num_threads(before)
