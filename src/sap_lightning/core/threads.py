"""Size torch's CPU thread pools to the CPUs this process may really use.

torch starts one intra-op thread per CPU of the machine. In a container, a cluster job or a
shared machine the process gets fewer: an affinity mask (``taskset``, SLURM's cpu binding) or a
cgroup CPU quota (Docker ``--cpus``, Kubernetes limits). Oversubscribed threads then spin
against each other: a training step ran 6x slower next to one busy process. ``usable_cpus``
reads both limits; ``configure_threads`` applies them once per process, overridable with
``SAP_NUM_THREADS`` (or the standard ``OMP_NUM_THREADS``, which torch honours itself).
Worker processes run one thread each: ``single_threaded_children`` for process pools, and
PyTorch's DataLoader workers set one torch thread themselves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
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


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested``, ``SAP_NUM_THREADS``, ``OMP_NUM_THREADS``
    or the usable CPUs, in that order; returns the number set."""
    import torch

    for value in (requested, os.environ.get(ENV_OVERRIDE), os.environ.get("OMP_NUM_THREADS")):
        if value not in (None, ""):
            threads = max(1, int(value))  # type: ignore[arg-type]
            break
    else:
        threads = usable_cpus()
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
