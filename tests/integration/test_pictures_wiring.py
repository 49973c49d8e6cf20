"""Every picture of a patient comes from ``inference/pictures.draw_case`` with the arrays the
command itself wrote or scored: ``sap predict`` (``<case>_mip.png``), ``sap evaluate``
(``pictures/<case>.png``) and each lesion validation (run folder or W&B). Each test redraws the
picture from the files on disk and compares pixels, so a picture of the wrong mask, frame or
threshold fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from sap_lightning.cli import main
from sap_lightning.dataset.images import read_image
from sap_lightning.dataset.layout import SKELETON_LABELS
from sap_lightning.inference.pictures import draw_case
from sap_lightning.metrics import lesion_detection
from tests.checkpoints import write_checkpoint
from tests.datasets import write_tiny_dataset
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

CASES = ["case000", "case001"]


def _png(path: Path) -> np.ndarray:
    """A PNG's RGB pixels as uint8 (``imread`` gives floats in [0, 1])."""
    return np.rint(imread(path)[..., :3] * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pictures")
    dataset = write_tiny_dataset(root / "lesion", n_cases=2, shape=(32, 32, 64))
    run = root / "run"
    write_checkpoint(run / "checkpoints" / "last.ckpt", seed=0)
    skeleton = write_checkpoint(root / "skeleton.ckpt", "skeleton", SKELETON_LABELS, seed=1)
    out = root / "out"
    args = ["predict", "--checkpoint", str(run), "--input", str(dataset), "--out", str(out)]
    extra = ["--skeleton-checkpoint", str(skeleton), "--threshold", "0.5", "--no-progress"]
    assert main([*args, *extra]) == 0
    return {"root": root, "dataset": dataset, "out": out, "run": run}


def test_predict_draws_each_case_from_its_written_mask_and_skeleton(predicted) -> None:
    out = predicted["out"]
    assert json.loads((out / "prediction.json").read_text())["pictures"] is True
    for case in CASES:
        b1000 = read_image(predicted["dataset"] / "imagesTr" / f"{case}_0001.nii.gz")
        mask = read_image(out / f"{case}.nii.gz").data
        skeleton = read_image(out / "skeleton" / f"{case}.nii.gz").data
        expected = draw_case(
            b1000.data,
            b1000.affine,
            prediction=mask,
            skeleton=skeleton,
            region_names=dict(enumerate(SKELETON_LABELS)),
            title=case,
        )
        assert np.array_equal(_png(out / f"{case}_mip.png"), expected.rgb)
    # Only masks sit at the top level with the dataset's ending: still an nnU-Net folder.
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in CASES]


def test_predict_without_pictures_writes_none(predicted) -> None:
    out = predicted["root"] / "no_pictures"
    args = ["predict", "--checkpoint", str(predicted["run"]), "--input", str(predicted["dataset"])]
    assert main([*args, "--out", str(out), "--no-pictures", "--no-progress"]) == 0
    assert not list(out.glob("*.png"))
    assert json.loads((out / "prediction.json").read_text())["pictures"] is False


def test_evaluate_draws_every_scored_case_with_its_counts(predicted) -> None:
    """``sap evaluate`` draws the mask it scored at its threshold against the label: the
    picture's true positives, false positives and misses are the evaluation's counts."""
    out = predicted["root"] / "evaluation"
    args = ["evaluate", "--predictions", str(predicted["out"]), "--dataset"]
    assert main([*args, str(predicted["dataset"]), "--threshold", "0.3", "--out", str(out)]) == 0
    cases = pd.read_csv(out / "cases.csv", dtype={"case_id": str}).set_index("case_id")
    for case in CASES:
        probability = read_image(predicted["out"] / "probabilities" / f"{case}.nii.gz").data
        label = read_image(predicted["dataset"] / "labelsTr" / f"{case}.nii.gz")
        b1000 = read_image(predicted["dataset"] / "imagesTr" / f"{case}_0001.nii.gz")
        prediction = probability >= np.float32(0.3)
        expected = draw_case(
            b1000.data, b1000.affine, prediction=prediction, reference=label.data, title=case
        )
        assert np.array_equal(_png(out / "pictures" / f"{case}.png"), expected.rgb)
        detection = expected.detection
        assert (detection.n_detected, detection.n_false_positive) == (
            cases.loc[case, "n_detected"],
            cases.loc[case, "n_fp"],
        )
        spacing = [abs(float(s)) for s in np.diag(label.affine)[:3]]
        assert detection == lesion_detection(prediction, label.data, spacing)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = prepare_tiny_datasets(tmp_path_factory.mktemp("validation_pictures"))
    runs = {}
    for logger in ("csv", "wandb"):
        run = data["root"] / f"run_{logger}"
        args = [
            "finetune",
            "--config",
            str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml"),
            *TINY_TRAINING,
            f"data.dataset={data['lesion']}",
            f"run_dir={run}",
            f"logger={logger}",
            "wandb.mode=offline",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1",
        ]
        assert main(args) == 0
        runs[logger] = run
    return runs


def test_each_validation_draws_the_same_cases_into_the_run_folder(validated) -> None:
    """With the CSV logger every validation writes ``pictures/step<N>/<case>.png``: the same
    cases each time (a fixed set, so pictures show training progress)."""
    steps = sorted((validated["csv"] / "pictures").iterdir())
    assert len(steps) == 2  # one validation per epoch
    drawn = [sorted(p.name for p in step.iterdir()) for step in steps]
    assert drawn[0] == drawn[1] and 1 <= len(drawn[0]) <= 3
    assert all(_png(step / drawn[0][0]).ndim == 3 for step in steps)


def test_each_validation_logs_its_pictures_to_wandb(validated) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    from sap_lightning.evaluation.curves import _wandb_payloads

    (path,) = validated["wandb"].glob("wandb/offline-run-*/run-*.wandb")
    keys = []
    for payload in _wandb_payloads(path):
        record = pb.Record.FromString(payload)
        if record.WhichOneof("record_type") == "history":
            keys += [item.key or "/".join(item.nested_key) for item in record.history.item]
    assert keys.count("val/pictures/_type") == 2  # one images-panel entry per validation
    assert not (validated["wandb"] / "pictures").exists()
