"""The whole chain: pretrain -> export -> fine-tune, for SAP and for SSL.

The fine-tuned network is captured at the start of training (before the first optimiser step)
and compared tensor by tensor with the exported pretrained network and with a scratch run of
the same seed (the fresh initialisation the untransferred tensors must keep).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sap_lightning.backbones import get_spec
from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.cli import main
from sap_lightning.config import load_config
from sap_lightning.core.io import read_json
from sap_lightning.pipeline.train import run_training
from tests.datasets import write_tiny_dataset
from tests.training import EXPERIMENTS, TINY_TRAINING

SMALL = ["logger=none", *TINY_TRAINING]
ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
SPEC = get_spec("unet_tiny")


class InitialWeights(L.Callback):
    """The network's weights when training starts, before any optimiser step."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    skeleton = write_tiny_dataset(
        root / "skeleton", n_cases=4, task="skeleton", shape=(32, 32, 48), lesions_per_case=9
    )
    lesion = write_tiny_dataset(root / "lesion", n_cases=6, shape=(32, 32, 96), seed=1)
    for task, dataset in (("skeleton", skeleton), ("lesion", lesion)):
        overrides = [f"task={task}", f"data.dataset={dataset}", "data.n_folds=3"]
        build_datamodule(load_config(None, overrides)).prepare_data()
    return {"skeleton": skeleton, "lesion": lesion, "root": root}


def finetune(data: dict[str, Path], init: str, pretrained: Path | None = None) -> InitialWeights:
    capture = InitialWeights()
    overrides = [
        *SMALL,
        f"data.dataset={data['lesion']}",
        f"run_dir={data['root'] / f'finetune_{init}'}",
        "trainer.fast_dev_run=true",
    ]
    if pretrained is not None:
        overrides.append(f"model.pretrained={pretrained}")
    cfg = load_config(EXPERIMENTS / "cpu" / f"finetune_{init}.yaml", overrides)
    run_training(cfg, extra_callbacks=[capture])
    assert capture.state, "training never started"
    return capture


def pretrain(data: dict[str, Path], command: str) -> Path:
    run_dir = data["root"] / command
    config = EXPERIMENTS / "cpu" / f"{'pretrain' if command == 'pretrain' else 'ssl'}.yaml"
    overrides = [*SMALL, *ONE_STEP, f"data.dataset={data['skeleton']}", f"run_dir={run_dir}"]
    rc = main([command, "--config", str(config), *overrides])
    assert rc == 0
    exported = torch.load(run_dir / "backbone.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # The export is the last epoch's network.
    for key, tensor in exported["state_dict"].items():
        assert torch.equal(tensor, last[f"net.{key}"]), key
    return run_dir


@pytest.fixture(scope="module")
def scratch(data: dict[str, Path]) -> dict[str, torch.Tensor]:
    return finetune(data, "scratch").state


def test_sap_fine_tuning_starts_from_the_pretrained_network_but_its_head(data, scratch) -> None:
    run_dir = pretrain(data, "pretrain")
    source = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert source["meta"]["task"] == "skeleton" and source["meta"]["out_channels"] == 10
    start = finetune(data, "sap", pretrained=run_dir).state
    changed_by_pretraining = 0
    for key, tensor in start.items():
        if SPEC.is_head_key(key):
            assert tensor.shape[0] == 2
            assert torch.equal(tensor, scratch[key]), f"{key}: not the fresh initialisation"
        else:
            assert torch.equal(tensor, source["state_dict"][key]), f"{key}: not transferred"
            changed_by_pretraining += not torch.equal(tensor, scratch[key])
    # Same seed, same layer shapes: only pretraining makes the transferred tensors differ from
    # a scratch start, so the comparison above could not pass by accident.
    assert changed_by_pretraining > len(start) // 2
    report = read_json(data["root"] / "finetune_sap" / "transfer_report.json")
    assert sorted(report["loaded"]) == sorted(k for k in start if not SPEC.is_head_key(k))


def test_ssl_fine_tuning_takes_the_encoder_only(data, scratch) -> None:
    run_dir = pretrain(data, "ssl")
    source = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert source["meta"]["task"] == "ssl"
    start = finetune(data, "ssl", pretrained=run_dir).state
    encoder = [k for k in start if SPEC.is_encoder_key(k)]
    assert encoder and len(encoder) < len(start)
    for key, tensor in start.items():
        expected = source["state_dict"][key] if key in encoder else scratch[key]
        assert torch.equal(tensor, expected), key
    assert sum(not torch.equal(start[k], scratch[k]) for k in encoder) > len(encoder) // 2
    report = read_json(data["root"] / "finetune_ssl" / "transfer_report.json")
    assert sorted(report["loaded"]) == sorted(encoder)
