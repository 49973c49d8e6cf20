"""The data commands through the real command line: import-folder, check-data, preprocess, split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_lightning.cache import open_cache
from sap_lightning.cache.splits import load_splits
from sap_lightning.cli import main
from sap_lightning.dataset.info import load_dataset
from tests.datasets import truncate, write_authors_folder, write_tiny_dataset


def test_import_then_check_is_clean(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=3)
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps({"pat00": "A", "pat01": "A", "pat02": "B"}))
    out = tmp_path / "ds"
    assert main(["import-folder", str(src), str(out), "--subjects", str(subjects)]) == 0
    assert "imported 3 cases (3 labelled, task lesion)" in capsys.readouterr().out
    assert main(["check-data", str(out)]) == 0
    assert "OK: 3 cases of 2 subjects, task lesion, channels T1, b1000" in capsys.readouterr().out
    # A second import into the same folder is refused and changes nothing.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["import-folder", str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_check_data_prints_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=3)
    truncate(root / "imagesTr/case000_0000.nii.gz")
    (root / "imagesTr/case001_0001.nii.gz").unlink()
    (root / "labelsTr/case002.nii.gz").unlink()
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("3 problems found")
    assert out[0].startswith("case case000: imagesTr/case000_0000.nii.gz: unreadable or corrupt")
    assert out[1] == "case case001: imagesTr/case001_0001.nii.gz: missing channel 1 (b1000)"
    assert out[2] == "case case002: labelsTr/case002.nii.gz: missing label"
    assert main(["check-data", str(root), "--no-labels", "--workers", "2"]) == 1
    assert "missing label" not in capsys.readouterr().out


def test_preprocess_end_to_end_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=3, lesions_per_case=[1, 2, 3])
    cache = tmp_path / "cache"
    assert (
        main(["preprocess", str(root), "--out", str(cache), "--target-spacing", "3", "3", "4"]) == 0
    )
    assert "3 cases written, 0 up to date" in capsys.readouterr().out
    opened = open_cache(cache)
    assert opened.case_ids == ["case000", "case001", "case002"]
    assert opened.load("case001").image.shape == (2, 10, 8, 12)
    assert (
        main(["preprocess", str(root), "--out", str(cache), "--target-spacing", "3", "3", "4"]) == 0
    )
    assert "0 cases written, 3 up to date (skipped)" in capsys.readouterr().out
    assert main(["preprocess", str(root), "--out", str(cache)]) == 0  # new spacing: rebuilt
    assert "3 cases written" in capsys.readouterr().out
    assert open_cache(cache).load("case001").image.shape == (2, 20, 16, 12)


def test_preprocess_refuses_a_broken_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=2)
    (root / "labelsTr/case001.nii.gz").unlink()
    (root / "dataset.json").write_text("{")
    assert main(["preprocess", str(root), "--out", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: malformed JSON" in err
    assert "case case001: labelsTr/case001.nii.gz: missing label" in err
    assert not (tmp_path / "cache").exists()


def test_split_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=7, lesions_per_case=[0, 1, 2, 3, 1, 2, 4])
    argv = ["split", str(root), "--folds", "3", "--tuning-fold", "2", "--seed", "1"]
    assert main(argv) == 0
    assert "splits.json written: 3 folds" in capsys.readouterr().out
    splits = load_splits(root / "splits.json", dataset=load_dataset(root))
    assert splits.tuning_fold == 2 and splits.test_folds == [0, 1]
    assert main(argv) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main([*argv[:-1], "2"]) == 2  # another seed would replace the folds
    assert "--force" in capsys.readouterr().err
    assert main(["split", str(root), "--folds", "9"]) == 2
    assert "cannot fill 9 folds" in capsys.readouterr().err


def test_check_data_through_the_installed_entry_point(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=2)
    image = root / "imagesTr/case001_0000.nii.gz"
    truncate(image)
    result = subprocess.run(
        [sys.executable, "-m", "sap_lightning", "check-data", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "case case001: imagesTr/case001_0000.nii.gz: unreadable or corrupt" in result.stdout
    assert len(result.stdout.splitlines()) == 2  # the problem and the summary
