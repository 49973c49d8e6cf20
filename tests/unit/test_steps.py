"""The study's step runner: dependency order, reuse of completed steps, and what a failure
leaves behind, in this process and in worker processes."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from sap_lightning.core.errors import SapError
from sap_lightning.pipeline.steps import Clock, Step, mark_done, run_steps, threads_per_worker


def _script(code: str) -> partial:
    """A picklable step action: a Python snippet in a child interpreter (fails on exit != 0)."""
    return partial(subprocess.run, [sys.executable, "-c", code], check=True)


def _write_after(seconds: float, path: Path, source: Path | None = None) -> partial:
    """Sleep, then write ``path`` (with ``source``'s text: a missing source fails the step)."""
    text = f"open({str(source)!r}).read()" if source else "'x'"
    return _script(f"import time; time.sleep({seconds}); open({str(path)!r}, 'w').write({text})")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_step_starts_after_the_steps_it_needs(tmp_path: Path, workers: int) -> None:
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    steps = [
        # "first" is slow: a runner that ignored `needs` would start "second" beside it, and
        # "second" would fail on the missing file
        Step("first", _write_after(1.0, first)),
        Step("second", _write_after(0.0, second, source=first), needs=("first",)),
        Step("third", _write_after(0.0, third, source=second), needs=("second",)),
    ]
    clock = Clock()
    run_steps(steps, clock, workers=workers)
    assert third.read_text() == "x"
    assert list(clock.seconds) == ["first", "second", "third"]
    assert clock.seconds["first"] >= 1.0


def _meet(mine: Path, other: Path) -> partial:
    """Write ``mine``, then wait for ``other``: passes only if both steps run at the same time
    (a runner that ran them in turn would leave the first waiting until it gives up)."""
    return _script(
        "import pathlib, time\n"
        f"pathlib.Path({str(mine)!r}).write_text('x')\n"
        "deadline = time.monotonic() + 60\n"
        f"while not pathlib.Path({str(other)!r}).exists():\n"
        "    if time.monotonic() > deadline: raise SystemExit('the other step never started')\n"
        "    time.sleep(0.05)\n"
    )


def test_independent_steps_run_at_once_in_workers(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    clock = Clock()
    run_steps([Step("a", _meet(a, b)), Step("b", _meet(b, a))], clock, workers=2)
    assert sorted(clock.seconds) == ["a", "b"]


@pytest.mark.parametrize("workers", [1, 2])
def test_completed_steps_are_reused_not_rerun(tmp_path: Path, workers: int) -> None:
    done = tmp_path / "done"
    mark_done(done)
    later = tmp_path / "later"
    steps = [
        Step("done", _script("raise SystemExit(1)"), folder=done),  # would fail if it ran
        Step("later", _write_after(0.0, later), needs=("done",)),
    ]
    clock = Clock()
    run_steps(steps, clock, workers=workers)
    assert clock.reused == ["done"] and list(clock.seconds) == ["later"]
    assert later.is_file()
    assert "reused from an earlier invocation: done" in clock.describe(workers, 1)


def _mark_after(path: Path, folder: Path) -> partial:
    """Write ``path``, then mark ``folder`` complete, as a study step does."""
    return _script(
        "import pathlib, json\n"
        f"pathlib.Path({str(path)!r}).write_text('new')\n"
        f"pathlib.Path({str(folder)!r}).mkdir(parents=True, exist_ok=True)\n"
        f"pathlib.Path({str(folder / 'study_step.json')!r}).write_text('{{}}')\n"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_redone_step_redoes_the_completed_steps_that_read_it(
    tmp_path: Path, workers: int
) -> None:
    """ "first" lost its completion mark (a user removed its folder to train it again): it runs,
    and "second", complete but computed from the old "first", is cleared and redone, while
    "apart", which does not read "first", is reused."""
    first, second, apart = (tmp_path / name for name in ("first", "second", "apart"))
    for folder in (second, apart):
        mark_done(folder)
    (second / "old_output").write_text("stale")
    steps = [
        Step("first", _mark_after(tmp_path / "first.out", first), folder=first),
        Step(
            "second",
            _mark_after(tmp_path / "second.out", second),
            folder=second,
            needs=("first",),
        ),
        Step("apart", _script("raise SystemExit(1)"), folder=apart),  # would fail if it ran
    ]
    clock = Clock()
    run_steps(steps, clock, workers=workers)
    assert sorted(clock.seconds) == ["first", "second"] and clock.reused == ["apart"]
    assert (tmp_path / "second.out").read_text() == "new"
    assert not (second / "old_output").exists()  # nothing of the stale result is kept


@pytest.mark.parametrize("workers", [1, 2])
def test_completed_steps_whose_check_fails_stop_the_run_before_any_step_starts(
    tmp_path: Path, workers: int
) -> None:
    """Every stale folder is named in one error, before anything runs: the first step would
    otherwise start (and the user fix one folder per attempt)."""
    first, one, two = tmp_path / "first", tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        mark_done(folder)
        (folder / "result").write_text("kept")

    def stale(name: str) -> None:
        raise SapError(f"{name} was completed with other settings")

    never = _script("raise SystemExit(1)")  # would fail if it ran
    steps = [
        Step("first", _write_after(0.0, first)),
        Step("one", never, folder=one, check_reuse=partial(stale, "one")),
        Step("two", never, folder=two, needs=("one",), check_reuse=partial(stale, "two")),
    ]
    with pytest.raises(SapError) as caught:
        run_steps(steps, Clock(), workers=workers)
    assert str(caught.value).splitlines() == [
        "one was completed with other settings",
        "two was completed with other settings",
    ]
    assert not first.exists()
    assert (one / "result").read_text() == (two / "result").read_text() == "kept"


def test_a_failure_starts_nothing_more_and_keeps_what_ran_beside_it(tmp_path: Path) -> None:
    beside, after = tmp_path / "beside", tmp_path / "after"
    steps = [
        Step("beside", _write_after(2.0, beside)),
        Step("fails", _script("raise SystemExit(3)")),
        Step("after", _write_after(0.0, after)),  # independent, but listed after the failure
    ]
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run_steps(steps, Clock(), workers=2)
    assert caught.value.returncode == 3
    assert beside.read_text() == "x"  # the running step finished (kept for the rerun)
    assert not after.exists()


def test_steps_must_follow_the_steps_they_need() -> None:
    noop = _script("pass")
    with pytest.raises(ValueError, match="'b' needs \\['a'\\]"):
        run_steps([Step("b", noop, needs=("a",)), Step("a", noop)], Clock())
    with pytest.raises(ValueError, match="two steps are named 'a'"):
        run_steps([Step("a", noop), Step("a", noop)], Clock())


def test_worker_processes_pin_the_thread_count(tmp_path: Path, monkeypatch) -> None:
    """Each worker runs with the given torch threads and passes them on to what it starts."""
    monkeypatch.delenv("SAP_NUM_THREADS", raising=False)
    out = tmp_path / "threads"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['SAP_NUM_THREADS'])"
    run_steps([Step("threads", _script(code))], Clock(), workers=2, threads=3)
    assert out.read_text() == "3"


def test_threads_per_worker_share_the_cpus_unless_pinned(monkeypatch) -> None:
    monkeypatch.delenv("SAP_NUM_THREADS", raising=False)
    assert [threads_per_worker(w, 8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("SAP_NUM_THREADS", "2")
    assert threads_per_worker(4, 8) == 2
