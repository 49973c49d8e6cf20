"""Several processes building and reading one preprocessing cache and one ``splits.json`` at once.

On a cluster, fold jobs of one study start together and each one prepares the data it needs;
users also run ``sap preprocess`` while a job reads the cache. Real processes (``python -m
sap_lightning``) are started together here: every one must succeed, and the result must be the
cache and splits one process builds alone. The cache and splits go to ``$SAP_PREPROCESSED``, so
the default locations are exercised too. The builders write slowly (``_slow_cli.py``), as
whole-body cases do, so that they overlap while their temporary case folders exist: without the
cache lock, this test fails (one builder deletes another's temporary folder, or finds its case
folder replaced under it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sap_lightning.cache import open_cache, preprocess_dataset
from sap_lightning.cache.splits import split_dataset
from sap_lightning.core.io import read_json
from sap_lightning.dataset.layout import PREPROCESSED_ENV
from tests.datasets import write_tiny_dataset

pytestmark = pytest.mark.slow  # starts several Python processes

SLOW_CLI = Path(__file__).with_name("_slow_cli.py")
SLOW_WRITE_S = "0.15"
"""Extra seconds per cached array (three per case)."""

READER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sap_lightning.cache import open_cache
    from sap_lightning.core.errors import DatasetError

    cache_root, stop = Path(sys.argv[1]), Path(sys.argv[2])
    deadline = time.monotonic() + 240
    complete_reads = 0
    while time.monotonic() < deadline and not (stop.exists() and complete_reads):
        try:
            cache = open_cache(cache_root)
        except DatasetError as err:  # not built yet, or being rebuilt: no cache.json
            if "preprocessing never finished" not in str(err):
                raise
            time.sleep(0.05)
            continue
        for case_id in cache.case_ids:  # a half-written cache would fail here
            case = cache.load(case_id, mmap=False)
            assert case.image.shape[1:] == tuple(cache.meta(case_id)["shape"]), case_id
            assert case.label.shape == case.image.shape[1:], case_id
        complete_reads += 1
    print(complete_reads)
    sys.exit(0 if complete_reads else 3)
    """
)


def _start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    output = open(log, "wb")  # noqa: SIM115 - closed in _finish
    process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
    output.close()  # the child holds its own copy
    return process, log


def _finish(started: list[tuple[subprocess.Popen, Path]], timeout: float = 300) -> list[str]:
    logs = []
    deadline = time.monotonic() + timeout
    for process, log in started:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs.append(log.read_text())
        assert process.returncode == 0, f"{process.args}\n{log.read_text()[-3000:]}"
    return logs


def assert_same_cache(got_root: Path, want_root: Path, copied_dataset: bool = False) -> None:
    """Same description, cases and metadata, and bit-identical arrays; for a cache of a copy of
    the dataset, the dataset's location (and its files' paths) may differ."""
    got, want = open_cache(got_root), open_cache(want_root)

    def where_free(record: dict, *keys: str) -> dict:
        return {k: v for k, v in record.items() if not (copied_dataset and k in keys)}

    assert where_free(got.description, "dataset") == where_free(want.description, "dataset")
    assert got.case_ids == want.case_ids
    for case_id in want.case_ids:
        a, b = got.load(case_id, mmap=False), want.load(case_id, mmap=False)
        assert where_free(a.meta, "sources") == where_free(b.meta, "sources"), case_id
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.body_mask, b.body_mask)
        assert a.class_locations.keys() == b.class_locations.keys()
        for value, locations in b.class_locations.items():
            np.testing.assert_array_equal(a.class_locations[value], locations)


def _hidden_leftovers(root: Path) -> list[str]:
    """Temporary files or folders of any writer (``.x.tmp-*``, ``.x.old-*``) under ``root``."""
    return sorted(str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("concurrency")
    return write_tiny_dataset(root / "lesion", n_cases=8, shape=(24, 24, 40), seed=3)


@pytest.mark.parametrize("force", [False, True], ids=["build", "force-rebuild"])
def test_concurrent_preprocess_split_and_readers_all_succeed(
    dataset: Path, tmp_path: Path, force: bool
) -> None:
    preprocessed = tmp_path / "preprocessed"
    env = {**os.environ, PREPROCESSED_ENV: str(preprocessed), "OMP_NUM_THREADS": "1"}
    cache_root = preprocessed / dataset.name / "cache"
    splits_path = preprocessed / dataset.name / "splits.json"
    sap = [sys.executable, "-m", "sap_lightning"]
    if force:  # a finished cache that four writers rebuild while two readers read it
        assert subprocess.run([*sap, "preprocess", str(dataset)], env=env).returncode == 0
    slow_sap = [sys.executable, str(SLOW_CLI), SLOW_WRITE_S]
    builders = [
        [*slow_sap, "preprocess", str(dataset), *(["--force"] if force and i % 2 else [])]
        for i in range(4)
    ]
    splitters = [[*sap, "split", str(dataset), "--folds", "3"] for _ in range(2)]
    stop = tmp_path / "writers_done"
    readers = [[sys.executable, "-c", READER, str(cache_root), str(stop)] for _ in range(1)]

    started = [
        _start(args, env, tmp_path / f"process{i}.log")
        for i, args in enumerate([*readers, *builders, *splitters])
    ]
    logs = _finish(started[len(readers) :])
    stop.touch()  # readers finish their current read (and at least one whole one) and stop
    logs += _finish(started[: len(readers)])

    assert all(int(log.split()[-1]) >= 1 for log in logs[-len(readers) :])  # read it whole
    written = [log for log in logs[:4] if "cases written" in log]
    assert len(written) == 4
    if not force:  # the first writer built it; the others waited and found it current
        assert sum(" 8 cases written" in log for log in written) == 1, written
        assert sum(" 0 cases written, 8 up to date" in log for log in written) == 3, written

    alone = tmp_path / "alone"
    preprocess_dataset(dataset, alone)
    assert_same_cache(cache_root, alone)
    assert _hidden_leftovers(preprocessed) == []
    assert sorted(p.name for p in cache_root.iterdir()) == [".lock", "cache.json", "cases"]

    _, _, wrote = split_dataset(dataset, n_folds=3, out=tmp_path / "splits_alone.json")
    assert wrote
    assert read_json(splits_path) == read_json(tmp_path / "splits_alone.json")
    assert not (dataset / "splits.json").exists()  # nothing went into the dataset
