"""Where caches and splits go (``SAP_PREPROCESSED``, the fallback for read-only datasets) and the
pieces that let several processes share them: the lock, per-writer temporary names, and the
clean-up that never takes a live writer's folder. End to end: tests/integration/test_concurrency.py
and the read-only tests of tests/integration/test_reliability.py."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.cache.build import _remove_leftovers
from sap_lightning.config import load_config
from sap_lightning.core.io import atomic_path, file_lock, writer_pid
from sap_lightning.dataset import layout


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv(layout.PREPROCESSED_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_defaults_sit_next_to_a_writable_dataset(no_env: Path) -> None:
    dataset = no_env / "data" / "Dataset001_Lesion"
    assert layout.default_cache_path(dataset) == no_env / "data" / "cache" / dataset.name
    assert layout.default_splits_path(dataset) == dataset / "splits.json"


def test_sap_preprocessed_holds_every_dataset_and_training_uses_it(
    no_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = no_env / "preprocessed"
    monkeypatch.setenv(layout.PREPROCESSED_ENV, str(root))
    dataset = no_env / "data" / "lesion"
    assert layout.default_cache_path(dataset) == root / "lesion" / "cache"
    assert layout.default_splits_path(dataset) == root / "lesion" / "splits.json"
    assert layout.default_cache_path(str(dataset) + "/") == root / "lesion" / "cache"

    module = build_datamodule(load_config(None, [f"data.dataset={dataset}"]))
    assert (module.cache_root, module.splits_path) == (
        root / "lesion" / "cache",
        root / "lesion" / "splits.json",
    )
    # data.cache / data.splits still win, per run.
    module = build_datamodule(
        load_config(
            None, [f"data.dataset={dataset}", "data.cache=/c/cache", "data.splits=/c/s.json"]
        )
    )
    assert (module.cache_root, module.splits_path) == (Path("/c/cache"), Path("/c/s.json"))


def test_read_only_dataset_falls_back_to_the_user_cache_with_a_log_line(
    no_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = no_env / "readonly" / "lesion"
    dataset.mkdir(parents=True)
    real = layout._is_writable
    monkeypatch.setattr(layout, "_is_writable", lambda p: real(p) and "readonly" not in str(p))
    with caplog.at_level(logging.INFO, logger=layout.__name__):
        cache = layout.default_cache_path(dataset)
        splits = layout.default_splits_path(dataset)
    assert cache == no_env / "xdg" / "sap_lightning" / "lesion" / "cache"
    assert splits == no_env / "xdg" / "sap_lightning" / "lesion" / "splits.json"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{no_env / 'readonly' / 'cache'} is not writable" in m for m in messages)
    assert all("SAP_PREPROCESSED" in m for m in messages)


def test_existing_splits_and_cache_of_a_read_only_dataset_are_still_used(
    no_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = no_env / "readonly" / "lesion"
    (no_env / "readonly" / "cache" / "lesion").mkdir(parents=True)
    dataset.mkdir(parents=True)
    (dataset / "splits.json").write_text("{}")
    monkeypatch.setattr(layout, "_is_writable", lambda p: False)
    assert layout.default_cache_path(dataset) == no_env / "readonly" / "cache" / "lesion"
    assert layout.default_splits_path(dataset) == dataset / "splits.json"


def test_writability_probe_sees_missing_folders_through_their_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []
    monkeypatch.setattr(layout.os, "access", lambda p, mode: asked.append(Path(p)) or True)
    assert layout._is_writable(tmp_path / "not" / "yet" / "there")
    assert asked == [tmp_path]  # the nearest existing folder is the one that must be writable


# ------------------------------------------------------------------------------- locking


def _held_elsewhere(path: Path) -> bool:
    """Whether another open of ``path`` is refused an exclusive lock (flock: per open file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_file_lock_excludes_others_until_released(tmp_path: Path) -> None:
    lock = tmp_path / "cache" / ".lock"
    with file_lock(lock) as held:
        assert held and _held_elsewhere(lock)
    assert not _held_elsewhere(lock)
    with file_lock(lock, shared=True) as held:  # readers exclude writers, not each other
        assert held and _held_elsewhere(lock)
        with file_lock(lock, shared=True) as also:
            assert also


def test_a_reader_without_a_lock_file_creates_nothing(tmp_path: Path) -> None:
    with file_lock(tmp_path / "cache" / ".lock", shared=True) as held:
        assert not held
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_differ_per_writer_and_carry_the_pid(tmp_path: Path) -> None:
    names = set()
    for _ in range(2):
        with atomic_path(tmp_path / "splits.json") as tmp:
            names.add(tmp.name)
            assert writer_pid(tmp.name) == os.getpid()
            tmp.write_text("{}")
    assert len(names) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]


def test_leftover_clean_up_keeps_a_live_writers_folder(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        dead_pid = int(dead.stdout)
        folders = {
            "live": tmp_path / f".case000.tmp-{live.pid}-abcd1234",
            "dead": tmp_path / f".case001.tmp-{dead_pid}-abcd1234",
            "dead_old": tmp_path / f".case002.old-{dead_pid}-abcd1234",
            "legacy": tmp_path / ".case003.tmp-x1y2z3w4",  # no pid: from an older version
            "case": tmp_path / "case004",
        }
        for folder in folders.values():
            folder.mkdir()
        _remove_leftovers(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [folders["live"].name, folders["case"].name]
        )
    finally:
        live.kill()
        live.wait()
