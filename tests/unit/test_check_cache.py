"""Remembered per-file check results: an unchanged dataset is not read again, a changed or broken
file always is."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sap_lightning.dataset import check_cache, file_checks
from sap_lightning.dataset.validate import check_dataset, require_valid_dataset
from tests.converted import convert_dataset
from tests.datasets import truncate, write_tiny_dataset

AGE_S = 3600


def _age(root: Path) -> None:
    """Date every file an hour back, like a dataset that was copied in earlier."""
    when = time.time() - AGE_S
    for path in root.rglob("*"):
        os.utime(path, (when, when))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files whose voxels the check reads, in order."""
    seen: list[str] = []
    inspect = file_checks._inspect_file

    def counting(path: Path, kind: str):
        seen.append(Path(path).name)
        return inspect(path, kind)

    monkeypatch.setattr(file_checks, "_inspect_file", counting)
    return seen


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=3)
    _age(root)
    return root


def test_second_check_reads_no_voxels(dataset: Path, reads: list[str]) -> None:
    assert check_dataset(dataset) == []
    assert len(reads) == 9  # 3 cases x (2 channels + label)
    assert check_cache.results_location(dataset).is_file()
    assert not list(dataset.glob(".*"))  # nothing is written into the dataset
    reads.clear()
    assert check_dataset(dataset) == []
    info = require_valid_dataset(dataset)
    assert reads == [] and info.case_ids == ["case000", "case001", "case002"]
    assert check_dataset(dataset, use_cache=False) == [] and len(reads) == 9


def test_a_touched_or_rewritten_file_is_read_again(dataset: Path, reads: list[str]) -> None:
    check_dataset(dataset)
    reads.clear()
    (dataset / "imagesTr/case001_0000.nii.gz").touch()  # new mtime, same bytes
    assert check_dataset(dataset) == []
    assert reads == ["case001_0000.nii.gz"]


def test_a_header_change_with_the_same_size_and_mtime_is_read_again(
    tmp_path: Path, reads: list[str]
) -> None:
    """``cp -p``/``rsync -t`` keep mtimes: the header hash still sees a changed NIfTI header."""
    root = convert_dataset(write_tiny_dataset(tmp_path / "gz", n_cases=2), tmp_path / "ds", ".nii")
    _age(root)
    check_dataset(root)
    reads.clear()
    path = root / "labelsTr/case000.nii"
    stat = path.stat()
    image = nib.load(path, mmap=False)  # the file is overwritten below
    affine = image.affine.copy()
    affine[0, 3] += 0.5
    shifted = nib.Nifti1Image(np.asarray(image.dataobj), affine, image.header)
    nib.save(shifted, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    problems = check_dataset(root)
    assert reads == ["case000.nii"]
    assert [(p.case, p.file) for p in problems] == [("case000", "labelsTr/case000.nii")]
    assert "affine differs" in problems[0].message


def test_a_broken_file_is_reported_every_time(dataset: Path, reads: list[str]) -> None:
    check_dataset(dataset)
    path = dataset / "imagesTr/case002_0001.nii.gz"
    stat = path.stat()
    truncate(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    for _ in range(2):
        reads.clear()
        problems = check_dataset(dataset)
        assert [(p.case, p.file) for p in problems] == [("case002", "imagesTr/case002_0001.nii.gz")]
        assert "unreadable or corrupt" in problems[0].message
        assert reads == ["case002_0001.nii.gz"]  # broken results are never remembered


def test_results_match_an_uncached_check(dataset: Path) -> None:
    """Remembered results give the same problems as reading everything (shape mismatch via
    cached shapes/affines, undeclared values via cached label values)."""
    check_dataset(dataset)
    spec = json.loads((dataset / "dataset.json").read_text())
    spec["labels"] = {"background": 0}  # every lesion voxel is now undeclared
    (dataset / "dataset.json").write_text(json.dumps(spec))
    cached = check_dataset(dataset, task="skeleton")
    assert cached == check_dataset(dataset, task="skeleton", use_cache=False)
    assert sum("label values [1] not declared" in p.message for p in cached) == 3


def test_freshly_written_files_are_not_remembered(tmp_path: Path, reads: list[str]) -> None:
    """A file modified within the racy margin could change again with the same mtime."""
    root = write_tiny_dataset(tmp_path / "ds", n_cases=1)
    check_dataset(root)
    reads.clear()
    check_dataset(root)
    assert len(reads) == 3


def test_results_go_to_the_user_cache_and_an_unwritable_one_never_fails(
    dataset: Path, tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(check_cache.CACHE_DIR_ENV, str(tmp_path / "user_cache"))
    assert check_dataset(dataset) == []
    assert check_cache.results_location(dataset).is_file()
    assert check_cache.results_location(dataset).is_relative_to(tmp_path / "user_cache")
    reads.clear()
    assert check_dataset(dataset) == [] and reads == []

    def nowhere(path: Path, obj):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(check_cache, "write_json", nowhere)
    check_cache.results_location(dataset).unlink()
    reads.clear()
    assert check_dataset(dataset) == [] and len(reads) == 9  # nothing remembered, no failure


def test_a_corrupt_results_file_is_ignored(dataset: Path, reads: list[str]) -> None:
    check_dataset(dataset)
    check_cache.results_location(dataset).write_text("{not json")
    reads.clear()
    assert check_dataset(dataset) == [] and len(reads) == 9
    reads.clear()
    assert check_dataset(dataset) == [] and reads == []  # rewritten by the previous check
