"""``sap predict`` outputs: layout, provenance, grid, dtypes, threshold, lesion table, regions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import sap_lightning
from sap_lightning.cli import main
from sap_lightning.core import mixed_precision, windows
from sap_lightning.dataset.layout import LESION_LABELS, SKELETON_LABELS
from sap_lightning.inference.burden import OTHER_BONE
from tests.checkpoints import write_checkpoint
from tests.datasets import body_of, write_tiny_dataset

SHAPE = (24, 20, 16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    dataset = write_tiny_dataset(root / "lesion", n_cases=2, shape=SHAPE)
    run = root / "run"
    write_checkpoint(run / "checkpoints" / "last.ckpt", "lesion", LESION_LABELS, seed=0)
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.5}))
    skeleton = write_checkpoint(root / "skeleton.ckpt", "skeleton", SKELETON_LABELS, seed=1)
    out = root / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run),
                "--input",
                str(dataset),
                "--out",
                str(out),
                "--skeleton-checkpoint",
                str(skeleton),
                "--no-progress",
            ]
        )
        == 0
    )
    return {"dataset": dataset, "out": out, "run": run, "skeleton": skeleton}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_masks_at_the_top_level(setup) -> None:
    """nnU-Net reads every top-level ``<case>.nii.gz`` of a prediction folder as a case."""
    out = setup["out"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case000.nii.gz", "case001.nii.gz"]
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == [
        "case000.nii.gz",
        "case001.nii.gz",
    ]
    assert sorted(p.name for p in (out / "skeleton").iterdir()) == [
        "case000.nii.gz",
        "case001.nii.gz",
    ]


def test_provenance_names_the_model_and_settings(setup) -> None:
    provenance = json.loads((setup["out"] / "prediction.json").read_text())
    checkpoint = setup["run"] / "checkpoints" / "last.ckpt"
    assert provenance["checkpoint"]["sha256"] == _sha256(checkpoint)
    assert Path(provenance["checkpoint"]["file"]) == checkpoint.resolve()
    assert Path(provenance["checkpoint"]["path"]) == setup["run"].resolve()
    assert provenance["skeleton_checkpoint"]["sha256"] == _sha256(setup["skeleton"])
    assert provenance["threshold"] == 0.5
    assert provenance["sap_lightning"] == sap_lightning.__version__
    assert Path(provenance["input"]) == setup["dataset"].resolve()
    assert provenance["overlap"] == 0.25 and len(provenance["window"]) == 3
    for case in ("case000", "case001"):
        summary = json.loads((setup["out"] / f"{case}_summary.json").read_text())
        assert summary["checkpoint_sha256"] == _sha256(checkpoint)


def test_outputs_share_the_input_grid(setup) -> None:
    image = nib.load(setup["dataset"] / "imagesTr" / "case000_0000.nii.gz")
    for name, dtype in [
        ("probabilities/case000", np.uint16),
        ("case000", np.uint8),
        ("skeleton/case000", np.uint8),
    ]:
        out = nib.load(setup["out"] / f"{name}.nii.gz")
        assert out.shape == image.shape
        np.testing.assert_allclose(out.affine, image.affine)
        assert out.get_data_dtype() == dtype


def test_mask_is_probability_at_the_run_threshold(setup) -> None:
    prob = nib.load(setup["out"] / "probabilities" / "case000.nii.gz").get_fdata()
    mask = np.asanyarray(nib.load(setup["out"] / "case000.nii.gz").dataobj)
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))


def test_table_and_summary_agree_with_the_mask(setup) -> None:
    mask = np.asanyarray(nib.load(setup["out"] / "case000.nii.gz").dataobj)
    skeleton = np.asanyarray(nib.load(setup["out"] / "skeleton" / "case000.nii.gz").dataobj)
    table = pd.read_csv(setup["out"] / "case000_lesions.csv")
    summary = json.loads((setup["out"] / "case000_summary.json").read_text())
    assert table["voxels"].sum() == mask.sum()
    assert summary["lesions"] == len(table)
    assert summary["total_volume_ml"] == pytest.approx(mask.sum() * 1.5 * 1.5 * 4.0 / 1000)
    assert set(table["region"]) <= set(SKELETON_LABELS) - {"background"} | {OTHER_BONE}
    assert set(np.unique(skeleton)) <= set(SKELETON_LABELS.values())


def test_threshold_override_and_plain_folder_input(setup, tmp_path: Path) -> None:
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for f in (setup["dataset"] / "imagesTr").glob("case001_*.nii.gz"):
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(setup["run"] / "checkpoints" / "last.ckpt"),
                "--input",
                str(folder),
                "--out",
                str(out),
                "--threshold",
                "0.99",
                "--no-progress",
            ]
        )
        == 0
    )
    prob = nib.load(out / "probabilities" / "case001.nii.gz").get_fdata()
    mask = np.asanyarray(nib.load(out / "case001.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, (prob >= 0.99).astype(np.uint8))
    assert json.loads((out / "case001_summary.json").read_text())["threshold"] == 0.99


def test_a_body_only_model_predicts_background_outside_the_body(setup, tmp_path: Path) -> None:
    """A checkpoint trained with ``validation.body_only`` (the same weights as the setup's) on a
    case whose air is exactly 0: zero lesion probability beyond the body the dataset drew and
    the mask's 2-voxel margin; the unmasked model's probabilities inside the body."""
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    body = body_of(SHAPE)
    for f in (setup["dataset"] / "imagesTr").glob("case000_*.nii.gz"):
        image = nib.load(f)
        air_free = np.where(body, np.asarray(image.dataobj), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(air_free, image.affine), folder / f.name)
    masked_run = tmp_path / "run"
    write_checkpoint(
        masked_run / "checkpoints" / "last.ckpt", "lesion", LESION_LABELS, seed=0, body_only=True
    )
    probabilities = {}
    for name, run in (("free", setup["run"]), ("masked", masked_run)):
        out = tmp_path / name
        args = ["predict", "--checkpoint", str(run), "--input", str(folder), "--out", str(out)]
        assert main([*args, "--no-progress"]) == 0
        probabilities[name] = nib.load(out / "probabilities" / "case000.nii.gz").get_fdata()
        provenance = json.loads((out / "prediction.json").read_text())
        assert provenance["body_only"] is (name == "masked")
    free, masked = probabilities["free"], probabilities["masked"]
    far = ~ndimage.binary_dilation(body, iterations=3)
    assert far.any() and free[far].max() > 0  # the unmasked model does put probability there
    assert masked[far].max() == 0.0
    np.testing.assert_array_equal(masked[body], free[body])


def test_the_recorded_inference_precision_is_used_unless_overridden(
    setup, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A checkpoint recording ``inference_precision: bf16-mixed`` (what the CPU files train
    with) predicts under bfloat16 autocast, says so in prediction.json and gives maps close to,
    but not equal to, the float32 maps of the same weights (the setup's); ``--precision
    32-true`` gives exactly those, and into the bfloat16 folder it is refused, naming the
    change."""
    monkeypatch.setattr(mixed_precision, "_cpu_supports", lambda dtype: True)  # any CPU
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    write_checkpoint(ckpt, "lesion", LESION_LABELS, seed=0, inference_precision="bf16-mixed")
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.5}))
    args = ["predict", "--checkpoint", str(run), "--input", str(setup["dataset"]), "--no-progress"]

    def probability(out: Path) -> np.ndarray:
        return nib.load(out / "probabilities" / "case000.nii.gz").get_fdata()

    assert main([*args, "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "prediction.json").read_text())["precision"] == (
        "bf16-mixed"
    )
    assert main([*args, "--out", str(tmp_path / "fp32"), "--precision", "32-true"]) == 0
    assert json.loads((tmp_path / "fp32" / "prediction.json").read_text())["precision"] == (
        "32-true"
    )
    float32 = probability(setup["out"])
    np.testing.assert_array_equal(probability(tmp_path / "fp32"), float32)
    difference = np.abs(probability(tmp_path / "bf16") - float32).max()
    assert 0 < difference < 0.05
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bf16"), "--precision", "32-true"]) == 2
    assert "precision 'bf16-mixed' -> '32-true'" in capsys.readouterr().err

    bogus = tmp_path / "bogus.ckpt"
    write_checkpoint(bogus, "lesion", LESION_LABELS, seed=0, inference_precision="fp8")
    assert main([*args[:2], str(bogus), *args[3:], "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "inference precision 'fp8'" in err
    assert not (tmp_path / "none").exists()


def test_the_recorded_window_batch_is_used_unless_overridden(
    setup, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A checkpoint recording ``sw_batch_size: 3`` (its run's ``validation.sw_batch_size``)
    runs its windows three at a time, ``--sw-batch-size 1`` one at a time, with the same maps as
    the setup's (the batch is speed, not result); a checkpoint recording no positive whole
    number is refused naming the file, nothing written."""
    batches: list[int] = []
    predict_volume = windows.predict_volume

    def counting(net, image, roi_size, **kwargs):
        batches.append(kwargs["sw_batch_size"])
        handle = net.register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
        try:
            return predict_volume(net, image, roi_size, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr("sap_lightning.inference.predict.predict_volume", counting)
    run = tmp_path / "run"
    write_checkpoint(
        run / "checkpoints" / "last.ckpt", "lesion", LESION_LABELS, seed=0, sw_batch_size=3
    )
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.5}))
    args = ["predict", "--checkpoint", str(run), "--input", str(setup["dataset"]), "--no-progress"]
    for out, extra, expected in (("recorded", [], 3), ("one", ["--sw-batch-size", "1"], 1)):
        batches.clear()
        assert main([*args, "--out", str(tmp_path / out), *extra]) == 0
        assert batches[0] == expected and max(batches[1:]) == expected
        np.testing.assert_allclose(
            nib.load(tmp_path / out / "probabilities" / "case000.nii.gz").get_fdata(),
            nib.load(setup["out"] / "probabilities" / "case000.nii.gz").get_fdata(),
            atol=1e-4,
        )

    bogus = tmp_path / "bogus.ckpt"
    write_checkpoint(bogus, "lesion", LESION_LABELS, seed=0, sw_batch_size=0)
    capsys.readouterr()
    assert main([*args[:2], str(bogus), *args[3:], "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "sw_batch_size" in err
    assert not (tmp_path / "none").exists()


def test_wrong_task_checkpoint_is_refused(setup, tmp_path: Path, capsys) -> None:
    skeleton = write_checkpoint(tmp_path / "s.ckpt", "skeleton", SKELETON_LABELS, seed=2)
    code = main(
        [
            "predict",
            "--checkpoint",
            str(skeleton),
            "--input",
            str(setup["dataset"]),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "'skeleton' model where a 'lesion' model is expected" in capsys.readouterr().err
