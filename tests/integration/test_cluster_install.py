"""``make install TORCH_SPEC=... TORCH_INDEX=...``: CUDA wheels from their index, and an install
stamp that follows both (a venv installed for one torch is reinstalled for another). Runs the
real ``make`` on the repository's Makefile: ``-n`` prints the recipe, ``-q`` says whether the
stamp is up to date."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA = ["TORCH_SPEC=torch==2.13.0+cu126", "TORCH_INDEX=https://download.pytorch.org/whl/cu126"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-C", str(REPO), f"VENV={venv}", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _stamp(venv: Path, *args: str) -> Path:
    printed = _make(venv, "-n", "install", *args).stdout
    (line,) = [line for line in printed.splitlines() if line.startswith("printf")]
    return Path(line.rsplit("> ", 1)[1].strip())


def test_cuda_wheels_come_from_their_index(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    printed = _make(venv, "-n", "install", *CUDA).stdout
    (torch_line,) = [
        line for line in printed.splitlines() if "pip install" in line and "torch==" in line
    ]
    assert "--index-url 'https://download.pytorch.org/whl/cu126'" in torch_line
    assert torch_line.endswith('"torch==2.13.0+cu126"')
    default = _make(venv, "-n", "install").stdout
    (plain,) = [
        line for line in default.splitlines() if "pip install" in line and "torch==" in line
    ]
    assert "--index-url" not in plain  # no index given: pip's own


def test_the_install_stamp_follows_the_torch_spec_and_index(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    cuda_stamp = _stamp(venv, *CUDA)
    cuda_stamp.write_text("installed\n")  # as the recipe leaves it
    assert _make(venv, "-q", "install", *CUDA).returncode == 0  # up to date: nothing to do
    assert _make(venv, "-q", "install").returncode == 1  # the CPU default: reinstall
    other_index = [CUDA[0], "TORCH_INDEX=https://download.pytorch.org/whl/cu128"]
    assert _make(venv, "-q", "install", *other_index).returncode == 1
    assert _stamp(venv) != cuda_stamp != _stamp(venv, *other_index)
