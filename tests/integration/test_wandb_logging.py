"""What runs send to W&B, read back from the real offline run files W&B writes: the exported
backbone as a model artifact with its metadata (pretraining), the transfer report, the
validation metrics including the ranking guard, and the evaluation table and FROC plot
(fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap_lightning.cli import main
from sap_lightning.evaluation.curves import _wandb_payloads, read_wandb_history
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

WANDB = ["logger=wandb", "wandb.mode=offline"]
ONE_EPOCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=1"]


def _records(run_dir: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [pb.Record.FromString(payload) for payload in _wandb_payloads(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = prepare_tiny_datasets(tmp_path_factory.mktemp("wandb_logging"))
    pretrain = data["root"] / "pretrain"
    finetune = data["root"] / "finetune"
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(EXPERIMENTS / "cpu" / "pretrain.yaml"),
                *TINY_TRAINING,
                *WANDB,
                *ONE_EPOCH,
                f"data.dataset={data['skeleton']}",
                f"run_dir={pretrain}",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "--config",
                str(EXPERIMENTS / "cpu" / "finetune_sap.yaml"),
                *TINY_TRAINING,
                *WANDB,
                *ONE_EPOCH,
                f"data.dataset={data['lesion']}",
                f"model.pretrained={pretrain}",
                f"run_dir={finetune}",
            ]
        )
        == 0
    )
    return {"pretrain": pretrain, "finetune": finetune}


def test_pretraining_logs_its_backbone_as_a_model_artifact(runs) -> None:
    artifacts = [r.artifact for r in _records(runs["pretrain"]) if r.HasField("artifact")]
    models = [a for a in artifacts if a.type == "model"]
    assert len(models) == 1
    metadata = json.loads(models[0].metadata)
    assert metadata["backbone"] == "unet_tiny" and metadata["task"] == "skeleton"
    assert [e.path for e in models[0].manifest.contents] == ["backbone.pt"]


def test_finetuning_logs_transfer_metrics_table_and_froc(runs) -> None:
    (path,) = runs["finetune"].glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(path)
    assert "val/f2_guarded" in history.columns
    # Media are logged as references to files W&B stores next to the run (a nested key).
    for key, kind in (
        ("transfer/report", "table-file"),
        ("evaluation/cases", "table-file"),
        ("evaluation/froc", "image-file"),
    ):
        assert history[f"{key}/_type"].dropna().tolist() == [kind], key
    summaries = [r.summary for r in _records(runs["finetune"]) if r.HasField("summary")]
    keys = {item.key for summary in summaries for item in summary.update}
    assert {"transfer/loaded", "transfer/init"} <= keys
