"""A 2-process DDP fine-tune (gloo on CPU) killed inside an epoch and resumed, through the real
command line: the resumed run ends in exactly the state of an uninterrupted one.

Only rank 0 writes ``last.ckpt``, so the patch queue's position it records must be one every
rank can resume from: each rank pops as many patches as the others, and on resumption each
rank skips that many of its own share of the epoch's plan. A rank that restarted its share, or
took rank 0's, would train on other patches, and its gradients, averaged into every rank's
weights, would leave a different final state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.datasets import write_tiny_dataset
from tests.killing import run_until_paused
from tests.training import DDP, EXPERIMENTS, TINY_TRAINING, run_sap_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS_PER_EPOCH = 3  # 3 training cases x 2 lesions x 2 patches, over 2 ranks in batches of 2


def _finetune(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--config",
        str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml"),
        *TINY_TRAINING,
        *DDP,
        "logger=none",
        "seed=7",
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "validation.every_n_epochs=3",
        f"data.dataset={dataset}",
        f"run_dir={run_dir}",
        *extra,
    ]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_ddp_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_state(
    tmp_path: Path,
) -> None:
    dataset = write_tiny_dataset(tmp_path / "lesion", n_cases=9, shape=(32, 32, 96), seed=2)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    # Every step writes last.ckpt, so the kill leaves one from inside epoch 1.
    every_step = "trainer.checkpoint_every_minutes=1e-6"

    run_sap_process(_finetune(dataset, reference_dir, every_step), tmp_path)
    reference = _state(reference_dir / "checkpoints" / "last.ckpt")
    assert reference["global_step"] == 3 * STEPS_PER_EPOCH

    killed = _finetune(dataset, killed_dir, every_step)
    run_until_paused(killed, "batch:1:1", tmp_path)
    saved = _state(killed_dir / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 1 and 0 < saved["global_step"] - STEPS_PER_EPOCH < STEPS_PER_EPOCH

    run_sap_process([*killed, "resume=true"], tmp_path)
    resumed = _state(killed_dir / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (
        reference["epoch"],
        reference["global_step"],
    )
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, tensor in reference["state_dict"].items():
        torch.testing.assert_close(
            resumed["state_dict"][key], tensor, rtol=1e-6, atol=1e-8, msg=key
        )
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
