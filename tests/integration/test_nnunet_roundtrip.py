"""nnU-Net interoperability: nnU-Net's own evaluator reads a ``sap predict`` folder, and nnU-Net's
``splits_final.json`` becomes ``sap split``'s folds.

nnU-Net v2 lives in its own venv (``make nnunet-venv``: its pins clash with ours) and runs in a
subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sap_lightning.cache.splits import load_splits
from sap_lightning.cli import main
from sap_lightning.metrics.overlap import dice
from tests.checkpoints import write_checkpoint
from tests.datasets import write_tiny_dataset

SHAPE = (24, 20, 16)
ROOT = Path(__file__).resolve().parents[2]


def _nnunet_bin() -> Path | None:
    configured = os.environ.get("SAP_NNUNET_BIN")
    folder = Path(configured) if configured else ROOT / ".venv-nnunet" / "bin"
    return folder if (folder / "nnUNetv2_evaluate_simple").is_file() else None


def _predict(checkpoint: Path, dataset: Path, out: Path, threshold: float) -> None:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out)]
    assert main([*args, "--threshold", str(threshold), "--no-progress"]) == 0


def test_nnunet_evaluator_scores_a_sap_predict_folder_like_we_do(tmp_path: Path) -> None:
    folder = _nnunet_bin()
    if folder is None:
        pytest.skip("nnU-Net venv not found (make nnunet-venv, or set SAP_NNUNET_BIN)")
    dataset = write_tiny_dataset(tmp_path / "lesion", n_cases=3, shape=SHAPE, lesions_per_case=3)
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", seed=0)
    # An untrained network: take a threshold inside its range so that masks are partial.
    _predict(checkpoint, dataset, tmp_path / "probe", 0.5)
    probe = nib.load(tmp_path / "probe" / "probabilities" / "case000.nii.gz").get_fdata()
    threshold = float(np.round(np.quantile(probe, 0.7), 4))
    out = tmp_path / "predictions"
    _predict(checkpoint, dataset, out, threshold)

    ours = {}
    for case in ("case000", "case001", "case002"):
        mask = np.asanyarray(nib.load(out / f"{case}.nii.gz").dataobj)
        label = np.asanyarray(nib.load(dataset / "labelsTr" / f"{case}.nii.gz").dataobj)
        assert 0 < mask.sum() < mask.size, case  # a real comparison, not an empty one
        ours[case] = dice(mask > 0, label > 0)

    result = tmp_path / "nnunet_summary.json"
    command = [
        str(folder / "nnUNetv2_evaluate_simple"),
        str(dataset / "labelsTr"),
        str(out),
        "-l",
        "1",
        "-o",
        str(result),
        "-np",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    summary = json.loads(result.read_text())
    theirs = {
        Path(entry["prediction_file"]).name[: -len(".nii.gz")]: entry["metrics"]["1"]["Dice"]
        for entry in summary["metric_per_case"]
    }
    assert sorted(theirs) == sorted(ours)  # masks only: no probability map taken for a case
    for case, value in ours.items():
        assert theirs[case] == pytest.approx(value, abs=1e-9), case


# ------------------------------------------------------------------------------ splits


def _splits_final(path: Path, folds: list[list[str]], cases: list[str]) -> Path:
    entries = [{"train": sorted(set(cases) - set(val)), "val": val} for val in folds]
    path.write_text(json.dumps(entries, indent=4))
    return path


@pytest.fixture(scope="module")
def lesion_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("nnunet_splits") / "lesion", n_cases=6)


CASES = [f"case{i:03d}" for i in range(6)]


def test_nnunet_folds_become_our_folds(lesion_dataset: Path, tmp_path: Path) -> None:
    folds = [["case004", "case001"], ["case000", "case005"], ["case002", "case003"]]
    source = _splits_final(tmp_path / "splits_final.json", folds, CASES)
    out = tmp_path / "splits.json"
    argv = ["split", str(lesion_dataset), "--from-nnunet", str(source), "--tuning-fold", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    splits = load_splits(out, dataset=CASES)
    assert [sorted(f) for f in splits.folds] == [sorted(f) for f in folds]
    assert splits.tuning_fold == 2 and splits.tuning_cases() == ["case002", "case003"]
    # nnU-Net trains fold k on every other case; here fold k's model also leaves out tuning
    assert splits.train_cases(0) == ["case000", "case005"]
    assert splits.test_cases(1) == ["case000", "case005"]
    assert main([*argv, "--out", str(out)]) == 0  # the same file again: unchanged


@pytest.mark.parametrize(
    ("folds", "problem"),
    [
        ([["case000", "case001", "nope"], ["case002", "case003"], ["case004", "case005"]],
         "fold 0: cases not in the dataset: nope"),
        ([["case000", "case001"], ["case001", "case002", "case003"], ["case004", "case005"]],
         "cases in the val sets of several folds: case001"),
        ([["case000", "case001"], ["case002", "case003"], ["case004"]],
         "dataset cases in no val set: case005"),
    ],
)  # fmt: skip
def test_bad_nnunet_splits_are_refused_in_one_line(
    lesion_dataset: Path, tmp_path: Path, capsys, folds: list[list[str]], problem: str
) -> None:
    source = _splits_final(tmp_path / "splits_final.json", folds, CASES)
    out = tmp_path / "splits.json"
    argv = ["split", str(lesion_dataset), "--from-nnunet", str(source), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err and str(source) in err, err
    assert not out.exists()


def test_malformed_nnunet_splits_file_is_refused(lesion_dataset: Path, tmp_path: Path, capsys):
    source = tmp_path / "splits_final.json"
    source.write_text(json.dumps({"train": CASES, "val": []}))
    argv = ["split", str(lesion_dataset), "--from-nnunet", str(source)]
    assert main([*argv, "--out", str(tmp_path / "s.json")]) == 2
    assert "non-empty list" in capsys.readouterr().err
