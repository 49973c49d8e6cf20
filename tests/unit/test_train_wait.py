"""Processes started together (torchrun, SLURM) wait for the launching one's cache and splits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sap_lightning.core.errors import ConfigError
from sap_lightning.pipeline.train import _wait_for


def test_waits_until_every_file_exists(tmp_path: Path) -> None:
    files = [tmp_path / "cache.json", tmp_path / "splits.json"]

    def write_later() -> None:
        for file in files:
            time.sleep(0.3)
            file.write_text("{}")

    writer = threading.Thread(target=write_later)
    writer.start()
    start = time.monotonic()
    _wait_for(files, "the cache", timeout_s=30)
    writer.join()
    assert all(f.exists() for f in files) and time.monotonic() - start >= 0.5


def test_gives_up_naming_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"still missing: .*splits\.json"):
        _wait_for([tmp_path / "splits.json"], "the splits", timeout_s=0.1)
