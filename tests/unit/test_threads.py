"""Thread pools sized to the CPUs a process may use: affinity, cgroup quota, competing load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sap_lightning.core.threads import (
    _cpu_busy_seconds,
    choose_threads,
    competing_cpus,
    configure_threads,
    free_cpus,
    usable_cpus,
)


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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_the_thread_count_is_chosen_without_importing_torch() -> None:
    """Data commands size SimpleITK with ``choose_threads``; it must not load torch for them."""
    code = (
        "import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from sap_lightning.core.threads import choose_threads; "
        "print(choose_threads(), choose_threads(3), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SAP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3", "False"]


def test_the_environment_pins_the_chosen_count(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SAP_NUM_THREADS", "3")
    assert choose_threads() == 3
    monkeypatch.setenv("SAP_NUM_THREADS", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads() == 2
    assert choose_threads(requested=5) == 5  # an explicit request wins over both


def test_a_cpu_counts_as_taken_once_another_process_uses_most_of_it() -> None:
    assert free_cpus(4, 0.0) == 4
    assert free_cpus(4, 0.5) == 4  # light background work keeps every thread
    assert free_cpus(4, 0.7) == 3
    assert free_cpus(4, 2.0) == 2
    assert free_cpus(2, 5.0) == 1  # never fewer than one
    assert free_cpus(1, 0.0) == 1


def test_busy_time_is_read_for_the_given_cpus_only(tmp_path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 100 5000 0 0 0 0 0 0\n"
        "cpu0 300 0 100 1000 50 0 0 0 0 0\n"  # busy 400 ticks, idle + iowait excluded
        "cpu1 500 0 0 4000 0 0 0 0 0 0\n"
        "intr 12345\n"
        "\n"
        "cpufreq_boost 1\n"
    )
    ticks = os.sysconf("SC_CLK_TCK")
    assert _cpu_busy_seconds({0}, stat) == pytest.approx(400 / ticks)
    assert _cpu_busy_seconds({0, 1}, stat) == pytest.approx(900 / ticks)
    assert _cpu_busy_seconds({0}, tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_a_process_spinning_on_our_cpu_is_seen_and_left_its_cpu() -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        measured = competing_cpus(interval=0.3)
    finally:
        busy.kill()
        busy.wait()
    assert measured >= 0.7  # a full CPU, less what the sampling misses
    usable = len(os.sched_getaffinity(0))
    assert free_cpus(usable, measured) == max(1, usable - 1)  # its CPU is left to it
