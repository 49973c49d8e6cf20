"""Uneven validation under 2-process DDP (gloo on CPU): 3 validation cases on 2 ranks.

The distributed sampler pads the second rank with a repeat of the first case. A run must neither
hang (a rank waiting in a collective the other never reaches) nor count the repeated case twice.
For lesion fine-tuning this is ``tests/distributed/test_finetune_ddp.py`` (``val/n_cases == 3``
and every lesion metric recomputed in one process); here the same holds for the skeleton module's
per-case Dice averages, recomputed from the saved network with MONAI's sliding-window inference
and a numpy Dice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.config import load_config
from sap_lightning.core.mixed_precision import effective_precision
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.inference.models import load_trained_model
from tests.datasets import write_tiny_dataset
from tests.tiny import TINY_NETWORK
from tests.training import DDP, last_logged_validation, run_sap_process

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "cpu" / "pretrain.yaml"
OVERRIDES = [
    "trainer.enable_progress_bar=false",
    TINY_NETWORK,
    "data.samples_per_volume=1",
    "data.queue_length=4",
    "data.val_fraction=0.5",
    "validation.every_n_epochs=1",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
]
BOXES_PER_CASE = [9, 2, 5, 9, 3, 7]
"""Different numbers of labelled bones per case, so cases score differently."""


def dice_per_class(prediction: np.ndarray, label: np.ndarray, classes: range) -> list[float]:
    """Dice of each class; 1.0 when the class is absent from both maps."""
    scores = []
    for k in classes:
        p, g = prediction == k, label == k
        total = p.sum() + g.sum()
        scores.append(1.0 if total == 0 else 2.0 * (p & g).sum() / total)
    return scores


def logged_validation(run_dir: Path) -> dict[str, float]:
    return last_logged_validation(run_dir, "val/dice_mean")


@pytest.mark.distributed
@pytest.mark.slow
def test_skeleton_validation_with_uneven_cases_counts_each_case_once(tmp_path: Path) -> None:
    dataset = write_tiny_dataset(
        tmp_path / "skeleton",
        n_cases=len(BOXES_PER_CASE),
        task="skeleton",
        shape=(32, 32, 48),
        lesions_per_case=BOXES_PER_CASE,
        seed=3,
    )
    run_dir = tmp_path / "run"
    overrides = [*OVERRIDES, f"data.dataset={dataset}", f"run_dir={run_dir}"]
    run_sap_process(["pretrain", "--config", str(CONFIG), *overrides, *DDP], tmp_path)
    logged = logged_validation(run_dir)

    net = load_trained_model(last_checkpoint_path(run_dir)).net
    cfg = load_config(CONFIG, [*overrides, "task=skeleton"])
    assert cfg.validation.body_only  # the CPU files' settings, applied to the reference below
    assert cfg.validation.precision == "bf16-mixed"  # float32 where the CPU lacks bf16 kernels
    bf16 = effective_precision(cfg.validation.precision, "cpu") == "bf16-mixed"
    datamodule = build_datamodule(cfg)
    assert len(datamodule.val_case_ids) == 3
    regions = list(datamodule.label_names[1:])
    per_case = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for case in datamodule.val_dataloader():
            logits = sliding_window_inference(
                case["image"],
                roi_size=cfg.data.patch_size,
                sw_batch_size=cfg.validation.sw_batch_size,
                predictor=net,
                overlap=cfg.validation.overlap,
                mode="gaussian",
            )
            prediction = logits.argmax(dim=1)[0].numpy()
            prediction[~case["body"][0, 0].numpy()] = 0  # background outside the body
            label = case["label"][0, 0].numpy()
            per_class = dice_per_class(prediction, label, range(1, len(regions) + 1))
            skeleton = dice_per_class(prediction > 0, label > 0, range(1, 2))
            per_case.append(per_class + skeleton)
    scores = np.array(per_case)  # (cases, regions + 1)

    def summary(rows: np.ndarray) -> dict[str, float]:
        means = rows.mean(axis=0)
        values = {f"val/dice_{name}": float(v) for name, v in zip(regions, means)}
        values["val/dice_mean"] = float(means[:-1].mean())
        values["val/dice_skeleton"] = float(means[-1])
        return values

    expected = summary(scores)
    assert {k for k in logged if k.startswith("val/dice")} == set(expected)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, abs=1e-5), name
    # The check can fail: counting the padded repeat of the first case changes the averages.
    padded = summary(np.concatenate([scores, scores[:1]]))
    assert max(abs(padded[k] - expected[k]) for k in expected) > 1e-3
