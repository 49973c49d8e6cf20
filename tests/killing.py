"""Kill a real ``sap`` process group with ``kill -9`` at a chosen point (``_pausing_cli.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

PAUSING_CLI = Path(__file__).parent / "integration" / "_pausing_cli.py"


def run_until_paused(
    args: list[str], where: str, workdir: Path, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """Start ``sap <args>`` in its own process group, wait until it pauses at ``where``, then
    ``kill -9`` the whole group (loader workers and study workers included).

    Returns what the pause point recorded (epoch and global step, or -1 and the case count).
    """
    marker, log = workdir / "paused.txt", workdir / "killed_run.log"
    marker.unlink(missing_ok=True)
    command = [sys.executable, str(PAUSING_CLI), str(marker), where, "--", *args]
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=output, stderr=output, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 240
            while not (marker.is_file() and marker.read_text().endswith("\n")):
                if process.poll() is not None:
                    pytest.fail(f"run ended before pausing:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"run never paused at {where}:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    first, second = (int(v) for v in marker.read_text().split())
    return first, second
