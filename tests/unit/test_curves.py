"""Training curves read back from the loggers that wrote them: a real W&B offline run and
Lightning's CSV logger."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sap_lightning.evaluation.curves import last_value, read_training_curves

LOSSES = [1.0, 0.5, 0.25, 0.125]


def test_a_wandb_offline_run_reads_back_every_logged_value(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="curves", dir=str(tmp_path), mode="offline", id="curves01")
    for step, loss in enumerate(LOSSES):
        run.log({"train/loss": loss, "epoch": step // 2}, step=step)
    run.log({"val/sensitivity": 0.75}, step=len(LOSSES) - 1)
    # Long text forces records across the 32 KiB blocks of the file format.
    run.log({"note": "x" * 70_000}, step=len(LOSSES))
    run.finish()
    curves = read_training_curves(tmp_path)
    rows = curves.dropna(subset=["train/loss"])
    assert rows["train/loss"].tolist() == LOSSES
    assert rows["step"].tolist() == list(range(len(LOSSES)))
    assert last_value(curves, "val/sensitivity") == 0.75
    assert math.isnan(last_value(curves, "val/missing"))


def test_csv_logs_read_back(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=tmp_path, name="csv")
    for step, loss in enumerate(LOSSES):
        logger.log_metrics({"train/loss": loss}, step=step)
    logger.save()
    curves = read_training_curves(tmp_path)
    assert curves["train/loss"].tolist() == LOSSES
    assert curves["step"].tolist() == list(range(len(LOSSES)))


def test_a_run_without_logs_gives_an_empty_frame(tmp_path: Path) -> None:
    assert read_training_curves(tmp_path).empty
