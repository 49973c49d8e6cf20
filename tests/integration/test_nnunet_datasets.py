"""nnU-Net datasets as they come: any lesion label name, several lesion classes, every file ending
nnU-Net accepts, and case ids whose outputs would collide, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.cache import open_cache
from sap_lightning.cache.splits import load_splits
from sap_lightning.cli import main
from sap_lightning.core.io import read_json
from tests.converted import convert_dataset
from tests.datasets import write_tiny_dataset
from tests.training import EXPERIMENTS, TINY_TRAINING

ENDINGS = (".nii", ".nrrd", ".mha")


def _relabel(root: Path, labels: dict[str, int]) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(spec))


def _lytic_blastic(root: Path) -> Path:
    """Relabel every second lesion of each case as class 2 (blastic); returns ``root``."""
    _relabel(root, {"background": 0, "lytic": 1, "blastic": 2})
    for path in sorted((root / "labelsTr").iterdir()):
        image = nib.load(path)
        components, count = ndimage.label(np.asarray(image.dataobj) > 0)
        label = np.asarray(image.dataobj).astype(np.uint8)
        for index in range(2, count + 1, 2):
            label[components == index] = 2
        nib.save(nib.Nifti1Image(label, image.affine), path)
    return root


def _lesion_count(path: Path) -> int:
    """Connected components of label > 0 (6-connectivity), read with nibabel."""
    return int(ndimage.label(np.asarray(nib.load(path).dataobj) > 0)[1])


def test_any_single_foreground_name_is_a_lesion_dataset(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=6, lesions_per_case=[1, 2, 3, 1, 2, 3])
    _relabel(root, {"background": 0, "metastasis": 1})
    assert main(["check-data", str(root)]) == 0
    assert "task lesion" in capsys.readouterr().out
    assert main(["split", str(root), "--folds", "3", "--tuning-fold", "2"]) == 0
    splits = load_splits(root / "splits.json")
    assert (splits.task, splits.n_folds, splits.tuning_fold) == ("lesion", 3, 2)
    cache = tmp_path / "cache"
    assert main(["preprocess", str(root), "--out", str(cache)]) == 0
    assert open_cache(cache).labels == {"background": 0, "metastasis": 1}


def test_several_lesion_classes_need_a_task(tmp_path: Path, capsys) -> None:
    root = _lytic_blastic(write_tiny_dataset(tmp_path / "ds", n_cases=4, lesions_per_case=3))
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dataset: dataset.json: labels ['lytic', 'blastic'] are neither")
    assert "--task lesion" in out[0] and "--task skeleton" in out[0]
    assert out[1].endswith("1 problem found")
    for command in ("preprocess", "split"):
        assert main([command, str(root)]) == 2
        err = capsys.readouterr().err
        assert "pass --task lesion" in err, command
    assert not (root / "splits.json").exists()
    assert not (tmp_path / "cache").exists()

    # --task lesion: one lesion class, every foreground voxel of either kind.
    assert main(["check-data", str(root), "--task", "lesion"]) == 0
    assert "task lesion (foreground labels merged" in capsys.readouterr().out
    cache = tmp_path / "cache_lesion"
    assert main(["preprocess", str(root), "--out", str(cache), "--task", "lesion"]) == 0
    opened = open_cache(cache)
    assert (opened.task, opened.labels) == ("lesion", {"background": 0, "lesion": 1})
    for case_id in opened.case_ids:
        expected = np.asarray(nib.load(root / f"labelsTr/{case_id}.nii.gz").dataobj) > 0
        np.testing.assert_array_equal(opened.load(case_id).label, expected.astype(np.uint8))
        assert len(opened.meta(case_id)["lesions"]) == 3
    assert main(["split", str(root), "--task", "lesion", "--folds", "2", "--tuning-fold", "0"]) == 0
    splits = load_splits(root / "splits.json")
    assert (splits.task, splits.n_folds) == ("lesion", 2)
    counts = json.loads((root / "splits.json").read_text())["lesion_counts"]
    assert counts == {c: _lesion_count(root / f"labelsTr/{c}.nii.gz") for c in counts} != {}

    # --task skeleton: the classes stay as they are.
    cache = tmp_path / "cache_skeleton"
    assert main(["preprocess", str(root), "--out", str(cache), "--task", "skeleton"]) == 0
    opened = open_cache(cache)
    assert (opened.task, opened.labels) == ("skeleton", {"background": 0, "lytic": 1, "blastic": 2})
    label = np.asarray(nib.load(root / "labelsTr/case000.nii.gz").dataobj)
    np.testing.assert_array_equal(opened.load("case000").label, label)


def test_the_ignore_label_through_every_command(tmp_path: Path, capsys) -> None:
    """A lesion dataset whose upper third (z >= 64) no station covered, labelled ``ignore``:
    checked, split, cached, trained on, predicted and evaluated through the command line."""
    root = write_tiny_dataset(tmp_path / "ds", n_cases=6, shape=(32, 32, 96), seed=1)
    _relabel(root, {"background": 0, "lesion": 1, "ignore": 2})
    for path in sorted((root / "labelsTr").iterdir()):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        label[..., 64:] = 2
        nib.save(nib.Nifti1Image(label, image.affine), path)
    assert main(["check-data", str(root)]) == 0
    assert "task lesion, label 'ignore' = 2" in capsys.readouterr().out

    assert main(["split", str(root), "--folds", "3", "--tuning-fold", "0"]) == 0
    counts = json.loads((root / "splits.json").read_text())["lesion_counts"]
    expected = {
        c: int(ndimage.label(np.asarray(nib.load(root / f"labelsTr/{c}.nii.gz").dataobj) == 1)[1])
        for c in counts
    }
    assert counts == expected != {}
    assert main(["preprocess", str(root)]) == 0
    cache = open_cache(tmp_path / "cache" / "ds")
    assert (cache.labels, cache.ignore_value) == ({"background": 0, "lesion": 1}, 255)
    assert (cache.load("case000").label[..., 64:] == 255).all()

    run = tmp_path / "run"
    overrides = [f"data.dataset={root}", f"run_dir={run}", "logger=csv", "trainer.max_epochs=1"]
    config = str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml")
    assert main(["finetune", "--config", config, *TINY_TRAINING, *overrides]) == 0
    assert "ignore" in read_json(run / "evaluation" / "summary.json")["rules"]

    out = tmp_path / "pred"
    predict = ["predict", "--checkpoint", str(run), "--input", str(root), "--out", str(out)]
    assert main([*predict, "--threshold", "0.5", "--no-pictures", "--no-progress"]) == 0
    cases = sorted(p.name[: -len(".nii.gz")] for p in out.glob("case*.nii.gz"))
    assert cases == [f"case{k:03d}" for k in range(6)]
    for case_id in cases:
        assert set(np.unique(nib.load(out / f"{case_id}.nii.gz").dataobj)) <= {0, 1}
    evaluate = ["evaluate", "--predictions", str(out), "--dataset", str(root)]
    assert main([*evaluate, "--threshold", "0.5", "--out", str(tmp_path / "ev")]) == 0
    summary = read_json(tmp_path / "ev" / "summary.json")
    assert summary["rules"]["ignore"].startswith("voxels of the reference's 'ignore' label")


def _write_masks(dataset: Path, out: Path, cases: list[str]) -> None:
    """Predictions as ``sap predict`` writes them: ``<case>.nii.gz`` on the input's voxel grid.
    Every second lesion is dropped, so the scores are not trivially perfect."""
    for case_id in cases:
        image = nib.load(dataset / f"labelsTr/{case_id}.nii.gz")
        components, _ = ndimage.label(np.asarray(image.dataobj) > 0)
        mask = (components % 2 == 1).astype(np.uint8)
        out.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, image.affine), out / f"{case_id}.nii.gz")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The tiny ``.nii.gz`` dataset, its cache, splits and an evaluation of fixed masks."""
    root = tmp_path_factory.mktemp("original")
    dataset = write_tiny_dataset(root / "ds", n_cases=4, lesions_per_case=[1, 2, 3, 2])
    assert main(["preprocess", str(dataset), "--out", str(root / "cache")]) == 0
    assert main(["split", str(dataset), "--folds", "2", "--tuning-fold", "0"]) == 0
    cases = ["case000", "case001", "case002", "case003"]
    _write_masks(dataset, root / "pred", cases)
    args = ["--predictions", str(root / "pred"), "--dataset", str(dataset)]
    assert main(["evaluate", *args, "--cases", ",".join(cases), "--out", str(root / "ev")]) == 0
    return dataset, root / "cache", root / "pred", root / "ev", cases


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_nnunet_file_ending_works_end_to_end(original, tmp_path, ending, capsys) -> None:
    dataset, cache, pred, evaluation, cases = original
    converted = convert_dataset(dataset, tmp_path / "ds", ending)
    assert not list(converted.rglob("*.nii.gz"))
    assert main(["check-data", str(converted)]) == 0
    assert f"files {ending}" in capsys.readouterr().out
    assert main(["preprocess", str(converted), "--out", str(tmp_path / "cache")]) == 0
    ours, theirs = open_cache(tmp_path / "cache"), open_cache(cache)
    assert ours.case_ids == theirs.case_ids == cases
    for case_id in cases:
        a, b = ours.load(case_id), theirs.load(case_id)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(ours.meta(case_id)["affine"], theirs.meta(case_id)["affine"],
                                   atol=1e-5)  # fmt: skip
        assert ours.meta(case_id)["lesions"] == theirs.meta(case_id)["lesions"]
    (converted / "splits.json").unlink()
    assert main(["split", str(converted), "--folds", "2", "--tuning-fold", "0"]) == 0
    assert (converted / "splits.json").read_text() == (dataset / "splits.json").read_text()
    args = ["--predictions", str(pred), "--dataset", str(converted), "--cases", ",".join(cases)]
    assert main(["evaluate", *args, "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev/summary.json").read_text())
    reference = json.loads((evaluation / "summary.json").read_text())
    assert summary["metrics"] == reference["metrics"]
    assert (tmp_path / "ev/cases.csv").read_text() == (evaluation / "cases.csv").read_text()


def test_files_of_another_ending_are_reported_once_per_folder(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "gz", n_cases=3)
    converted = convert_dataset(root, tmp_path / "ds", ".nrrd")
    spec = json.loads((converted / "dataset.json").read_text())
    spec["file_ending"] = ".nii.gz"  # what the files are not
    (converted / "dataset.json").write_text(json.dumps(spec))
    assert main(["check-data", str(converted)]) == 1
    out = capsys.readouterr().out.splitlines()
    mismatch = [line for line in out if "end in '.nrrd'" in line]
    assert [line.split(":")[1].strip() for line in mismatch] == ["imagesTr", "labelsTr"]
    assert "6 files end in '.nrrd'" in mismatch[0] and "3 files" in mismatch[1]
    assert not any("unexpected entry" in line for line in out)


def test_case_ids_whose_outputs_collide_are_refused(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=4)
    renames = {"case000": "p", "case001": "p_prob", "case002": "P_Summary", "case003": "q_lesions"}
    for folder in ("imagesTr", "labelsTr"):
        for path in sorted((root / folder).iterdir()):
            old = next(c for c in renames if path.name.startswith(c))
            path.rename(path.with_name(renames[old] + path.name[len(old) :]))
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("2 problems found")
    assert out[0].startswith("case P_Summary: imagesTr/P_Summary_0000.nii.gz: case id 'P_Summary'")
    assert "'p'" in out[0] and "overwrite" in out[0]
    assert out[1].startswith("case p_prob: imagesTr/p_prob_0000.nii.gz: case id 'p_prob'")
    # q_lesions has no case q: no collision; renaming the colliding cases clears the check.
    for folder in ("imagesTr", "labelsTr"):
        for path in sorted((root / folder).iterdir()):
            if path.name.startswith(("p_prob", "P_Summary")):
                path.rename(path.with_name("x" + path.name))
    assert main(["check-data", str(root)]) == 0


def test_training_reads_an_ambiguous_label_set_with_the_experiments_task(tmp_path: Path) -> None:
    """The experiment's ``task`` is the ``--task`` of training: the pipeline's check, cache and
    splits all read lytic + blastic as one lesion class."""
    from sap_lightning.config import load_config
    from sap_lightning.pipeline.train import _build_datamodule

    root = _lytic_blastic(write_tiny_dataset(tmp_path / "ds", n_cases=4, lesions_per_case=3))
    overrides = [f"data.dataset={root}", "data.n_folds=2", "data.tuning_fold=0", "data.fold=1"]
    datamodule = _build_datamodule(load_config(None, ["task=lesion", *overrides]), primary=True)
    cache = open_cache(datamodule.cache_root)
    assert (cache.task, cache.labels) == ("lesion", {"background": 0, "lesion": 1})
    assert int(cache.load("case000").label.max()) == 1
    assert load_splits(datamodule.splits_path).n_folds == 2
