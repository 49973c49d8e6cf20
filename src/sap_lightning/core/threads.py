"""Size torch's CPU thread pools to the CPUs this process may really use.

torch starts one intra-op thread per CPU of the machine. In a container, a cluster job or a
shared machine the process gets fewer: an affinity mask (``taskset``, SLURM's cpu binding) or a
cgroup CPU quota (Docker ``--cpus``, Kubernetes limits). Oversubscribed threads then spin
against each other: a training step ran 6x slower next to one busy process. ``usable_cpus``
reads both limits. Neither sees another process busy on the same CPUs (a second job on a shared
node): torch's spinning OpenMP threads then lose most of their time waiting for the one that was
preempted (measured by ``benchmarks/bench_threads.py``: 2 threads next to one busy process took
452 ms per step, 1 thread 163 ms). ``choose_threads`` therefore also samples, for a fifth of a
second, how much CPU other processes use on the usable CPUs and leaves those to them;
``configure_threads`` gives torch that many threads. Only the latter imports torch (lazily): the
data commands never load it, and size their own pools (SimpleITK, worker processes). Set
``SAP_NUM_THREADS`` (or the standard ``OMP_NUM_THREADS``) to pin the count, e.g. for bitwise
reproducible runs: the thread count changes the order of floating-point sums.
Worker processes run one thread each: ``single_threaded_children`` for process pools, and
PyTorch's DataLoader workers set one torch thread themselves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ENV_OVERRIDE = "SAP_NUM_THREADS"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), if any."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def _cpu_busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    """Seconds the given CPUs spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *fields = line.split() or [""]
        if not name[3:].isdigit() or not name.startswith("cpu") or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(values) - values[3] - values[4]
    return busy / ticks


def competing_cpus(interval: float = 0.2) -> float:
    """CPUs' worth of work that other processes ran on this process's CPUs during ``interval``.

    0.0 where it cannot be measured (no ``/proc/stat``). Our own CPU time over the interval is
    subtracted, so a busy parent does not count against itself.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:
        return 0.0
    start_busy, start_own, start = _cpu_busy_seconds(cpus), time.process_time(), time.monotonic()
    if start_busy is None:
        return 0.0
    time.sleep(interval)
    end_busy = _cpu_busy_seconds(cpus)
    own, elapsed = time.process_time() - start_own, time.monotonic() - start
    if end_busy is None or elapsed <= 0:
        return 0.0
    return max(0.0, (end_busy - start_busy - own) / elapsed)


def free_cpus(usable: int, competing: float) -> int:
    """Threads to run on ``usable`` CPUs while other processes keep ``competing`` of them busy.

    A CPU counts as taken once another process uses more than 60% of one: a half-busy CPU still
    preempts a spinning thread often enough to stall the whole pool.
    """
    return max(1, usable - math.floor(competing + 0.4))


def choose_threads(requested: int | None = None, pool: str = "torch") -> int:
    """The thread count for this process: ``requested``, ``SAP_NUM_THREADS``, ``OMP_NUM_THREADS``,
    or else the usable CPUs less those other processes keep busy (``pool`` names the thread pool
    in the log line).

    Imports no torch, so commands that never run a tensor operation (the data commands, which
    size SimpleITK's pool or worker processes) decide their threads without paying for it.
    """
    for value in (requested, os.environ.get(ENV_OVERRIDE), os.environ.get("OMP_NUM_THREADS")):
        if value not in (None, ""):
            return max(1, int(value))  # type: ignore[arg-type]
    usable = usable_cpus()
    competing = competing_cpus() if usable > 1 else 0.0
    threads = free_cpus(usable, competing)
    if threads < usable:
        log.info(
            "%s uses %d of %d CPUs: other processes keep %.1f CPUs busy (set %s to pin the count)",
            pool,
            threads,
            usable,
            competing,
            ENV_OVERRIDE,
        )
    return threads


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`choose_threads`; returns the number set.

    torch is imported here, not at module level: only commands that run tensors call this.
    """
    import torch

    threads = choose_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.debug("torch uses %d CPU threads", threads)
    return threads


WORKER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Start worker processes inside this block with one thread each.

    Worker pools (preprocessing) already use one process per CPU; a native thread pool per
    worker on top (OpenMP, MKL, OpenBLAS read these variables when they load, so the child's
    environment is the only place to set them) would oversubscribe the CPUs. Variables the user
    has set are kept; the parent's environment is restored on exit.
    """
    saved = {name: os.environ.get(name) for name in (*WORKER_THREAD_VARIABLES, ENV_OVERRIDE)}
    try:
        for name in (*WORKER_THREAD_VARIABLES, ENV_OVERRIDE):
            if not os.environ.get(name):
                os.environ[name] = "1"
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_processes(requested: int) -> int:
    """Worker processes to start for ``requested``: never more than the usable CPUs."""
    return max(1, min(int(requested), usable_cpus()))
