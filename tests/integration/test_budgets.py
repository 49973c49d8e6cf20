"""Budgets in optimiser steps: every fold gets the same number of steps whatever its lesion
count, and the learning-rate schedule follows the steps (warm-up, then cosine to the floor)."""

from __future__ import annotations

import math

import pytest
import torch

from sap_lightning.cli import main
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

STEPS, WARMUP, FLOOR, LR = 5, 2, 0.1, 3e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return prepare_tiny_datasets(tmp_path_factory.mktemp("budgets"))


def test_every_fold_gets_the_same_steps_and_a_per_step_schedule(data) -> None:
    for fold in (1, 2):
        run = data["root"] / f"fold{fold}"
        rc = main(
            [
                "finetune",
                "--config",
                str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml"),
                *TINY_TRAINING,
                "logger=none",
                f"data.dataset={data['lesion']}",
                f"data.fold={fold}",
                f"run_dir={run}",
                f"trainer.max_steps={STEPS}",
                "trainer.max_epochs=1000",
                "trainer.limit_train_batches=null",
                f"optim.warmup_steps={WARMUP}",
                f"optim.min_lr_ratio={FLOOR}",
                f"optim.lr={LR}",
                "validation.every_n_epochs=1000",
            ]
        )
        assert rc == 0
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == STEPS
        (scheduler,) = checkpoint["lr_schedulers"]
        assert scheduler["last_epoch"] == STEPS  # stepped once per optimiser step
        # After the budget the cosine has reached its floor: lr = FLOOR x base rate.
        group_lrs = [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]]
        assert all(math.isclose(lr, FLOOR * LR, rel_tol=1e-6) for lr in group_lrs)
        # The last model was validated although every_n_epochs skipped it.
        assert (run / "evaluation" / "summary.json").is_file()
