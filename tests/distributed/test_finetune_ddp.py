"""A 2-process DDP fine-tuning run (gloo on CPU) through the real command line, in a subprocess.

The validation metrics it logs must be the metrics of the whole validation set, each case once:
they are recomputed here in one process from the saved last checkpoint, with MONAI's sliding
window inference called directly. With 3 validation cases on 2 ranks the distributed sampler
pads one rank with a repeated case, so a missing gather or de-duplication would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.config import load_config
from sap_lightning.core.mixed_precision import effective_precision
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.inference.models import load_trained_model
from sap_lightning.metrics import make_lesion_metrics
from sap_lightning.metrics.lesion import guarded_f2
from tests.datasets import write_tiny_dataset
from tests.training import (
    DDP,
    EXPERIMENTS,
    TINY_TRAINING,
    last_logged_validation,
    run_sap_process,
)

CONFIG = EXPERIMENTS / "cpu" / "finetune_scratch.yaml"
OVERRIDES = [
    *TINY_TRAINING,
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
]


def _last_validation_row(run_dir: Path) -> dict[str, float]:
    return last_logged_validation(run_dir, "val/n_cases")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_finetune_logs_global_validation_metrics(tmp_path: Path) -> None:
    dataset = write_tiny_dataset(tmp_path / "lesion", n_cases=9, shape=(32, 32, 96), seed=2)
    run_dir = tmp_path / "run"
    overrides = [*OVERRIDES, f"data.dataset={dataset}", f"run_dir={run_dir}"]
    command = ["finetune", "--config", str(CONFIG), *overrides, *DDP]
    done = run_sap_process(command, tmp_path)
    assert done.stdout.count("run folder:") == 1  # only the launching rank reports
    logged = _last_validation_row(run_dir)

    # One-process reference: the saved network over every validation case.
    net = load_trained_model(last_checkpoint_path(run_dir)).net
    cfg = load_config(CONFIG, [*overrides, "task=lesion"])
    reference = make_lesion_metrics(
        threshold=cfg.validation.threshold,
        connectivity=cfg.validation.connectivity,
        tolerance_mm=cfg.validation.tolerance_mm,
        prefix="val/",
    )
    assert cfg.validation.body_only  # the CPU files' settings, applied to the reference below
    assert cfg.validation.precision == "bf16-mixed"  # float32 where the CPU lacks bf16 kernels
    bf16 = effective_precision(cfg.validation.precision, "cpu") == "bf16-mixed"
    datamodule = build_datamodule(cfg)
    assert len(datamodule.val_case_ids) == 3
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
            probability = torch.softmax(logits, dim=1)[0, 1]
            probability = probability * case["body"][0, 0]  # no lesion outside the body
            reference.update(
                probability,
                case["label"][0, 0],
                spacing=case["spacing"][0],
                case_id=case["case_id"][0],
            )
    expected = {k: float(v) for k, v in reference.compute().items()}
    expected["val/f2_guarded"] = guarded_f2(expected["val/f2"], expected["val/volume_ratio"])
    assert logged["val/n_cases"] == 3
    assert set(logged) == set(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(logged[name]), name
        else:
            assert logged[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
