"""Run a study's steps in dependency order: one after the other in this process, or several at
once in worker processes.

A step that completed in an earlier invocation (its folder holds ``study_step.json``) is reused,
not rerun, so an interrupted study continues where it stopped; unless a step it reads was
redone in this invocation (then it is redone too) or its ``check_reuse`` finds it stale (then
the study stops before any step starts). With ``workers > 1`` each step runs in a spawned
process with a fixed number of torch threads. Every step seeds itself and
writes only its own folder, so the outputs depend on the threads per step, not on which steps
happened to overlap.

``concurrent.futures`` is used rather than a workflow engine (Snakemake, Luigi): a study has a
dozen steps whose dependencies are known up front, and the step folders already record what is
done.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap_lightning.core.errors import SapError
from sap_lightning.core.io import write_json
from sap_lightning.core.logs import configure_logging
from sap_lightning.core.threads import ENV_OVERRIDE, configure_threads

log = logging.getLogger(__name__)

DONE_FILE = "study_step.json"
"""Written into a step's folder when the step completed; a folder without it is redone."""


def is_done(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def mark_done(folder: Path, **info: Any) -> None:
    write_json(folder / DONE_FILE, info)


@dataclass(frozen=True)
class Step:
    """One unit of the study. ``action`` must pickle (a ``functools.partial`` of a module-level
    function) when steps run in worker processes."""

    name: str
    action: Callable[[], Any]
    folder: Path | None = None
    """Where the step writes; complete (``study_step.json``) means reused, not rerun."""
    needs: tuple[str, ...] = ()
    """Names of the steps whose outputs this one reads."""
    check_reuse: Callable[[], None] | None = None
    """Called before a completed ``folder`` is reused; raises when it is stale."""


def _reusable(step: Step, redone: set[str]) -> bool:
    """Whether ``step``'s completed folder can be reused: not when a step it reads was redone
    in this invocation (its folder is cleared and the step runs again). ``check_reuse`` ran
    before the first step (:func:`_check_completed`)."""
    if step.folder is None or not is_done(step.folder):
        return False
    stale = [need for need in step.needs if need in redone]
    if stale:
        verb = "was" if len(stale) == 1 else "were"
        log.info("study: redoing %s: %s %s redone", step.name, " and ".join(stale), verb)
        shutil.rmtree(step.folder)
        return False
    return True


def _check_completed(steps: Sequence[Step]) -> None:
    """Run every completed step's ``check_reuse`` before anything starts, so one error names
    every stale folder (and nothing is half redone when one is refused)."""
    problems = []
    for step in steps:
        if step.check_reuse is not None and step.folder is not None and is_done(step.folder):
            try:
                step.check_reuse()
            except SapError as error:
                problems.append(str(error))
    if problems:
        raise SapError("\n".join(problems))


class Clock:
    """Wall time of the whole study and of every step (steps overlap when workers run them)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def record(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def step(self, name: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` here and record its wall time."""
        start = time.perf_counter()
        log.info("study: %s", name)
        result = action()
        self.record(name, time.perf_counter() - start)
        return result

    def reuse(self, name: str, folder: Path) -> None:
        log.info("study: %s (reusing %s)", name, folder)
        self.reused.append(name)

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start

    def describe(self, workers: int = 1, threads: int | None = None) -> str:
        steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items())
        how = ""
        if workers > 1:
            how = f"{workers} workers, {threads} torch threads per worker, steps overlapping; "
        text = f"{self.wall_seconds / 60:.1f} min ({how}{steps})"
        if self.reused:
            text += f"; reused from an earlier invocation: {', '.join(self.reused)}"
        return text


def threads_per_worker(workers: int, usable: int) -> int:
    """Torch threads of each worker process: ``SAP_NUM_THREADS`` when set, else an equal share
    of the usable CPUs (at least one)."""
    pinned = os.environ.get(ENV_OVERRIDE)
    if pinned not in (None, ""):
        return max(1, int(pinned))  # type: ignore[arg-type]
    return max(1, usable // workers)


def run_steps(
    steps: Sequence[Step], clock: Clock, workers: int = 1, threads: int | None = None
) -> None:
    """Run ``steps`` (listed in an order where each comes after the steps it needs).

    With ``workers > 1`` ready steps start in list order as workers free up. When a step fails,
    no further step starts; the running ones finish (their outputs are kept for the rerun) and
    the first error is raised.
    """
    _check_order(steps)
    _check_completed(steps)
    if workers <= 1:
        redone: set[str] = set()
        for step in steps:
            if _reusable(step, redone):
                clock.reuse(step.name, step.folder)  # type: ignore[arg-type]
            else:
                clock.step(step.name, step.action)
                redone.add(step.name)
        return
    _run_in_workers(steps, clock, workers, threads or 1)


def _check_order(steps: Sequence[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        missing = [need for need in step.needs if need not in seen]
        if missing:
            raise ValueError(f"step {step.name!r} needs {missing}, which do not come before it")
        if step.name in seen:
            raise ValueError(f"two steps are named {step.name!r}")
        seen.add(step.name)


def _run_in_workers(steps: Sequence[Step], clock: Clock, workers: int, threads: int) -> None:
    waiting = list(steps)
    finished: set[str] = set()
    redone: set[str] = set()
    running: dict[Future[float], Step] = {}
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    # spawn, not fork: a forked child inherits torch's thread pools and any open handles.
    context = multiprocessing.get_context("spawn")
    log.info("study: %d workers, %d torch threads per worker", workers, threads)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(threads, verbose)
    ) as pool:
        while waiting or running:
            ready = [step for step in waiting if set(step.needs) <= finished]
            complete = [s for s in ready if _reusable(s, redone)]
            for step in complete:
                waiting.remove(step)
                clock.reuse(step.name, step.folder)  # type: ignore[arg-type]
                finished.add(step.name)
            if complete:
                continue  # they may make further steps ready
            for step in ready[: workers - len(running)]:
                waiting.remove(step)
                log.info("study: %s", step.name)
                running[pool.submit(_timed, step.action)] = step
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                # Ctrl-C reached the workers too: each interrupted run keeps its last checkpoint.
                log.error("study: interrupted; waiting for the running steps to stop")
                pool.shutdown(wait=True, cancel_futures=True)
                raise SapError(
                    "study interrupted; run it again to continue where it stopped "
                    "(completed steps are kept, interrupted runs resume)"
                ) from None
            for future in done:
                step = running.pop(future)
                error = future.exception()
                if error is not None:
                    if running:
                        log.error(
                            "study: %s failed; waiting for %s to finish (kept for the rerun)",
                            step.name,
                            ", ".join(s.name for s in running.values()),
                        )
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise error
                clock.record(step.name, future.result())
                finished.add(step.name)
                redone.add(step.name)


def _start_worker(threads: int, verbose: bool) -> None:
    """Worker process set-up: the parent's logging, and a pinned torch thread count (also for
    anything that reads ``SAP_NUM_THREADS`` later)."""
    os.environ[ENV_OVERRIDE] = str(threads)
    configure_logging(verbose)
    configure_threads(threads)


def _timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
