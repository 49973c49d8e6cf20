"""Shared settings of the tests that train: the CPU experiments shrunk to seconds, and a reader
for the validation values a run logged."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.config import load_config
from tests.datasets import write_tiny_dataset
from tests.tiny import TINY_CONFIG, TINY_NETWORK

__all__ = ["TINY_NETWORK"]

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY_TRAINING = [
    "trainer.enable_progress_bar=false",
    TINY_NETWORK,
    "data.samples_per_volume=1",
    "data.queue_length=4",
    "data.n_folds=3",
    "validation.every_n_epochs=1",
]
"""Overrides that shrink any CPU experiment to a few seconds (the tiny U-Net at minimal width)."""


DDP = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp"]
"""Two processes on the CPU (gloo), launched by Lightning from the command line."""


def run_sap_process(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """``sap <args>`` in a subprocess that must succeed (a hang fails on the timeout). DDP runs
    need their own process: Lightning starts rank 1 by running the command line again."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-m", "sap_lightning", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def last_logged_validation(run_dir: Path, key: str) -> dict[str, float]:
    """The ``val/*`` values of the single CSV-logged row holding ``key``."""
    (metrics,) = (Path(run_dir) / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get(key)]
    assert len(rows) == 1
    return {k: float(v) for k, v in rows[0].items() if k.startswith("val/") and v != ""}


def prepare_tiny_datasets(root: Path) -> dict[str, Path]:
    """Tiny skeleton and lesion datasets with their caches and splits built, as runs build them."""
    skeleton = write_tiny_dataset(
        root / "skeleton", n_cases=4, task="skeleton", shape=(32, 32, 48), lesions_per_case=9
    )
    lesion = write_tiny_dataset(root / "lesion", n_cases=6, shape=(32, 32, 96), seed=1)
    for task, dataset in (("skeleton", skeleton), ("lesion", lesion)):
        build_datamodule(
            load_config(TINY_CONFIG, [f"task={task}", f"data.dataset={dataset}", "data.n_folds=3"])
        ).prepare_data()
    return {"root": root, "skeleton": skeleton, "lesion": lesion}
