"""A ``sap predict`` folder holds one model's predictions: provenance, refusal, --overwrite,
resuming, and ``sap evaluate`` refusing folders that mix models (through the command line)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sap_lightning.cli import main
from sap_lightning.core.errors import DatasetError
from sap_lightning.evaluation.predictions import (
    EvaluationSettings,
    evaluate_predictions,
    write_evaluation,
)
from sap_lightning.inference.predict import Predictor
from tests.checkpoints import write_checkpoint
from tests.datasets import write_tiny_dataset

SHAPE = (24, 20, 16)
CASES = ["case000", "case001"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _predict(data: dict[str, Path], model: str, out: Path, *extra: str) -> int:
    args = ["predict", "--checkpoint", str(data[model]), "--input", str(data["dataset"])]
    return main([*args, "--out", str(out), "--threshold", "0.5", "--no-progress", *extra])


def _evaluate(data: dict[str, Path], predictions: Path, out: Path) -> int:
    args = ["evaluate", "--predictions", str(predictions), "--dataset", str(data["dataset"])]
    return main([*args, "--cases", ",".join(CASES), "--threshold", "0.5", "--out", str(out)])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, two different lesion models and model A's complete prediction folder."""
    root = tmp_path_factory.mktemp("folders")
    found = {"dataset": write_tiny_dataset(root / "lesion", n_cases=2, shape=SHAPE)}
    found["a"] = write_checkpoint(root / "a.ckpt", seed=0)
    found["b"] = write_checkpoint(root / "b.ckpt", seed=1)
    found["out_a"] = root / "out_a"
    found["out_b"] = root / "out_b"
    assert _predict(found, "a", found["out_a"]) == 0
    assert _predict(found, "b", found["out_b"]) == 0
    return found


def _copy(data: dict[str, Path], tmp_path: Path, which: str = "out_a") -> Path:
    return Path(shutil.copytree(data[which], tmp_path / which))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_another_model_or_threshold_is_refused_before_anything_is_written(
    data, tmp_path: Path, capsys
) -> None:
    out = _copy(data, tmp_path)
    before = snapshot(out)
    capsys.readouterr()
    assert _predict(data, "b", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "another model" in err and "checkpoint sha256" in err and "--overwrite" in err
    assert _sha(data["a"])[:12] in err and _sha(data["b"])[:12] in err
    assert snapshot(out) == before

    args = ["predict", "--checkpoint", str(data["a"]), "--input", str(data["dataset"])]
    assert main([*args, "--out", str(out), "--threshold", "0.7", "--no-progress"]) == 2
    assert "threshold 0.5 -> 0.7" in capsys.readouterr().err
    assert snapshot(out) == before


def test_case_files_without_provenance_are_refused(data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    out.mkdir()
    shutil.copy(data["out_b"] / "case001.nii.gz", out / "case001.nii.gz")
    (out / "README.txt").write_text("not a prediction\n")
    capsys.readouterr()
    assert _predict(data, "a", out) == 2
    err = capsys.readouterr().err
    assert "case001" in err and "without a prediction.json" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "case001.nii.gz"]


def test_overwrite_clears_only_prediction_outputs(data, tmp_path: Path) -> None:
    out = _copy(data, tmp_path)
    keep = {
        "notes.txt": b"mine\n",
        "plans.json": b"{}\n",
        "probabilities/readme.md": b"mine too\n",
        "case000_prob.csv": b"not ours\n",
    }
    for name, content in keep.items():
        (out / name).write_bytes(content)
    # model B predicts only case000: model A's case001 must not survive to pose as B's
    Predictor(data["b"], threshold=0.5, progress=False).predict(
        data["dataset"], out, case_ids=["case000"], overwrite=True
    )
    files = snapshot(out)
    for name, content in keep.items():
        assert files[name] == content
    ours = sorted(n for n in files if n not in keep)
    assert ours == [
        "case000.nii.gz",
        "case000_lesions.csv",
        "case000_mip.png",
        "case000_summary.json",
        "prediction.json",
        "probabilities/case000.nii.gz",
    ]
    provenance = json.loads(files["prediction.json"])
    assert provenance["checkpoint"]["sha256"] == _sha(data["b"])
    summary = json.loads(files["case000_summary.json"])
    assert summary["checkpoint_sha256"] == _sha(data["b"])
    # B's case000 equals B's prediction into a fresh folder
    fresh = snapshot(data["out_b"])
    for name in ("case000.nii.gz", "probabilities/case000.nii.gz", "case000_lesions.csv"):
        assert files[name] == fresh[name], name


def test_same_model_resumes_its_own_folder(data, tmp_path: Path) -> None:
    out = _copy(data, tmp_path)
    before = snapshot(out)
    (out / "case001_summary.json").unlink()  # as an interrupted run leaves it
    (out / "case001_lesions.csv").unlink()
    assert _predict(data, "a", out) == 0
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    for name in after:
        if name.endswith(".json") and name != "prediction.json":
            assert json.loads(after[name]) == json.loads(before[name]), name
        elif name != "prediction.json":
            assert after[name] == before[name], name


def test_evaluate_refuses_a_folder_mixing_models(data, tmp_path: Path, capsys) -> None:
    out = _copy(data, tmp_path)
    for name in ("case001.nii.gz", "probabilities/case001.nii.gz", "case001_summary.json"):
        shutil.copy(data["out_b"] / name, out / name)  # as an old interrupted run left it
    capsys.readouterr()
    assert _evaluate(data, out, tmp_path / "evaluation") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "['case001']" in err and "another model" in err and "case000" not in err
    assert not (tmp_path / "evaluation").exists()

    (out / "case001_summary.json").unlink()  # files of a case without its model's summary
    assert _evaluate(data, out, tmp_path / "evaluation") == 2
    err = capsys.readouterr().err
    assert "['case001']" in err and "no summary" in err

    (out / "prediction.json").unlink()  # summaries of two models, no provenance at all
    shutil.copy(data["out_b"] / "case001_summary.json", out / "case001_summary.json")
    assert _evaluate(data, out, tmp_path / "evaluation") == 2
    err = capsys.readouterr().err
    assert "mixes the predictions of several models" in err
    assert "['case000']" in err and "['case001']" in err


def test_a_folder_of_another_layout_version_is_refused_naming_it(
    data, tmp_path: Path, capsys
) -> None:
    """``prediction.json`` records the layout version; a folder of another version is refused
    by ``sap evaluate`` and ``sap predict`` in one line naming it, and nothing is written."""
    out = tmp_path / "other_version"
    shutil.copytree(data["out_a"], out)
    provenance = json.loads((out / "prediction.json").read_text())
    provenance["format"] = 1
    (out / "prediction.json").write_text(json.dumps(provenance))
    capsys.readouterr()
    assert _evaluate(data, out, tmp_path / "evaluation") == 2
    err = capsys.readouterr().err
    assert "prediction folder format 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "evaluation").exists()


def test_cross_validation_folders_evaluate_together(data, tmp_path: Path) -> None:
    """One folder per fold model: each case is read from the folder that predicted it."""
    fold0, fold1 = tmp_path / "fold0", tmp_path / "fold1"
    for model, fold, case in (("a", fold0, "case000"), ("b", fold1, "case001")):
        Predictor(data[model], threshold=0.5, progress=False).predict(
            data["dataset"], fold, case_ids=[case]
        )
    at = EvaluationSettings(threshold=0.5)
    together = evaluate_predictions([fold0, fold1], data["dataset"], CASES, at).cases
    alone_a = evaluate_predictions(data["out_a"], data["dataset"], CASES, at).cases
    alone_b = evaluate_predictions(data["out_b"], data["dataset"], CASES, at).cases
    expected = pd.concat(
        [alone_a[alone_a.case_id == "case000"], alone_b[alone_b.case_id == "case001"]]
    )
    pd.testing.assert_frame_equal(
        together.set_index("case_id").sort_index(), expected.set_index("case_id").sort_index()
    )
    evaluation = evaluate_predictions([fold0, fold1], data["dataset"], CASES, at)
    assert evaluation.summary["sources"]["predictions"] == [str(fold0), str(fold1)]
    write_evaluation(evaluation, tmp_path / "evaluation")

    shutil.copytree(fold0, tmp_path / "both", ignore=shutil.ignore_patterns("prediction.json"))
    with pytest.raises(DatasetError, match="case000: predicted in several folders"):
        evaluate_predictions([fold0, fold1, tmp_path / "both"], data["dataset"], CASES, at)
