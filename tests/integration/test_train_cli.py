"""``sap pretrain`` / ``sap ssl`` / ``sap finetune`` through the real command line, on tiny data.

Every run composes the real CPU experiment files (``experiments/cpu``) with overrides that
shrink it: the tiny U-Net at minimal widths, 32^3 patches, one or two steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sap_lightning.cli import main
from sap_lightning.config import load_config, load_study_config
from sap_lightning.core.io import read_json
from sap_lightning.modules import LesionSegmentation, build_module
from tests.datasets import truncate, write_tiny_dataset
from tests.tiny import TINY_CONFIG
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

SMALL = TINY_TRAINING
DATA_INFO = {
    "in_channels": 2,
    "channel_names": ["T1", "b1000"],
    "spacing": [1.5, 1.5, 4.0],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    datasets = prepare_tiny_datasets(root)
    # Untrained exported backbones stand in for pretraining runs (the chain test trains them).
    exported = {}
    for task, name in (("skeleton", "skeleton.pt"), ("ssl", "ssl.pt")):
        cfg = load_config(TINY_CONFIG, [f"task={task}"])
        info = {
            **DATA_INFO,
            "num_classes": 10 if task == "skeleton" else None,
            "label_names": [f"c{i}" for i in range(10)] if task == "skeleton" else [],
        }
        exported[f"{task}_backbone"] = build_module(cfg, info).export_backbone(root / name)
    return {**datasets, **exported}


def sap(command: str, config: str, *overrides: str) -> int:
    return main([command, "--config", str(EXPERIMENTS / config), *SMALL, *overrides])


def test_every_experiment_file_composes() -> None:
    for path in sorted(EXPERIMENTS.glob("*/*.yaml")):
        if path.parent.name not in ("base", "study", "sweeps"):  # presets; other schemas
            load_config(path)
    for path in sorted((EXPERIMENTS / "study").glob("*.yaml")):
        load_study_config(path)
    paper = load_config(EXPERIMENTS / "paper" / "finetune_sap.yaml", ["data.fold=4"])
    assert paper.model.backbone == "swin_unetr" and paper.data.patch_size == [96, 96, 96]
    assert (paper.optim.encoder_lr, paper.optim.decoder_lr) == (2e-6, 1e-5)
    assert paper.trainer.precision == "16-mixed" and paper.trainer.devices == 2
    assert paper.name == "paper_finetune_sap_fold4"
    ssl = load_config(EXPERIMENTS / "paper" / "finetune_ssl.yaml")
    assert (ssl.optim.encoder_lr, ssl.optim.decoder_lr) == (5e-6, 1e-5)
    scratch = load_config(EXPERIMENTS / "paper" / "finetune_scratch.yaml")
    assert (scratch.optim.lr, scratch.optim.encoder_lr) == (1e-5, None)


@pytest.mark.parametrize(
    ("command", "config", "init"),
    [
        ("pretrain", "cpu/pretrain.yaml", None),
        ("ssl", "cpu/ssl.yaml", None),
        ("finetune", "cpu/finetune_scratch.yaml", "scratch"),
        ("finetune", "cpu/finetune_sap.yaml", "sap"),
        ("finetune", "cpu/finetune_ssl.yaml", "ssl"),
    ],
)
def test_fast_dev_run(data, tmp_path: Path, command: str, config: str, init: str | None) -> None:
    dataset = data["lesion"] if command == "finetune" else data["skeleton"]
    extra = (
        []
        if init in (None, "scratch")
        else [f"model.pretrained={data[{'sap': 'skeleton', 'ssl': 'ssl'}[init] + '_backbone']}"]
    )
    run_dir = tmp_path / "run"
    rc = sap(
        command,
        config,
        f"data.dataset={dataset}",
        f"run_dir={run_dir}",
        "trainer.fast_dev_run=true",
        "logger=none",
        *extra,
    )
    assert rc == 0
    saved = load_config(run_dir / "config.yaml")
    assert saved.task == {"pretrain": "skeleton", "ssl": "ssl", "finetune": "lesion"}[command]
    assert saved.run_dir == str(run_dir)
    if command == "finetune":
        report = read_json(run_dir / "transfer_report.json")
        assert report["init"] == init
        if init == "sap":
            assert report["mode"] == "all_but_head" and not report["missing"]
            assert set(report["skipped"]) == {"final_conv.weight", "final_conv.bias"}
        if init == "ssl":
            assert report["mode"] == "encoder"
            assert all(key.startswith(("conv_0.", "down_")) for key in report["loaded"])
    else:
        exported = torch.load(run_dir / "backbone.pt", weights_only=True)
        assert exported["meta"]["task"] == saved.task


def test_three_channels_fine_tune_from_a_two_channel_network(data, tmp_path: Path) -> None:
    """T1 + b1000 + ADC data (channels from dataset.json) fine-tuned from the T1 + b1000
    skeleton network: the report names the new channel, the run's own initialisation keeps both
    pretrained kernels and starts ADC's at zero, and the run predicts the three-channel cases."""
    three = write_tiny_dataset(
        tmp_path / "three", n_cases=6, shape=(32, 32, 96), seed=1, channels=("T1", "b1000", "ADC")
    )
    run = tmp_path / "run"
    rc = sap(
        "finetune",
        "cpu/finetune_sap.yaml",
        f"data.dataset={three}",
        f"run_dir={run}",
        f"model.pretrained={data['skeleton_backbone']}",
        "logger=none",
        "trainer.max_epochs=1",
    )
    assert rc == 0
    report = read_json(run / "transfer_report.json")
    key = "conv_0.conv_0.conv.weight"
    assert report["adapted"] == [key] and not report["missing"]
    assert report["channels"]["new"] == ["ADC"]
    assert report["channels"]["model"] == ["T1", "b1000", "ADC"]
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["sap_meta"]["channel_names"] == ["T1", "b1000", "ADC"]
    # The run's initialisation again, from its own config and data info (training moved it on).
    data_info = trained["hyper_parameters"]["data_info"]
    module = build_module(load_config(run / "config.yaml"), data_info)
    module.initialise_from_pretrained()
    pretrained = torch.load(data["skeleton_backbone"], weights_only=True)["state_dict"][key]
    weight = module.net.state_dict()[key]
    assert torch.equal(weight[:, :2], pretrained) and not weight[:, 2].any()
    out = tmp_path / "pred"
    predict = ["predict", "--checkpoint", str(run), "--input", str(three), "--out", str(out)]
    assert main([*predict, "--threshold", "0.5", "--no-pictures", "--no-progress"]) == 0
    assert len(list(out.glob("case*.nii.gz"))) == 6


def test_resume_and_refusal_to_overwrite(data, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    common = [
        f"data.dataset={data['lesion']}",
        f"run_dir={run_dir}",
        "logger=csv",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    ]
    assert sap("finetune", "cpu/finetune_scratch.yaml", *common, "trainer.max_epochs=1") == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 1
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert first["sap_meta"]["task"] == "lesion"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    capsys.readouterr()
    assert sap("finetune", "cpu/finetune_scratch.yaml", *common, "trainer.max_epochs=1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    assert (
        sap("finetune", "cpu/finetune_scratch.yaml", *common, "trainer.max_epochs=2", "resume=true")
        == 0
    )
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # One more epoch of one step, continuing from the first run's counters.
    assert (second["epoch"], second["global_step"]) == (first["epoch"] + 1, 2)
    assert load_config(run_dir / "config.resume1.yaml").resume
    assert not load_config(run_dir / "config.yaml").resume
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0", "version_1"]
    # A checkpoint rebuilds its module from the plain hyper-parameters alone.
    module = LesionSegmentation.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", weights_only=True
    )
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, second["state_dict"][key]), key

    capsys.readouterr()
    fresh = [f"run_dir={tmp_path / 'empty'}", "resume=true"]
    assert sap("finetune", "cpu/finetune_scratch.yaml", *common[:1], *fresh) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_mistyped_key_is_refused_and_named(data, capsys) -> None:
    assert sap("pretrain", "cpu/pretrain.yaml", "trainer.max_epoch=1") == 2
    err = capsys.readouterr().err
    assert "trainer.max_epoch" in err and "max_epochs" in err


def test_process_copying_strategies_are_refused(data, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"data.dataset={data['lesion']}",
        f"run_dir={run_dir}",
        "trainer.strategy=ddp_spawn",
    ]
    assert sap("finetune", "cpu/finetune_scratch.yaml", *overrides) == 2
    assert "'ddp_spawn' is not supported" in capsys.readouterr().err
    assert not run_dir.exists()


def test_broken_dataset_is_refused_before_training(data, tmp_path: Path, capsys) -> None:
    dataset = tmp_path / "lesion"
    shutil.copytree(data["lesion"], dataset)
    cache = data["root"] / "cache" / "lesion"
    assert cache.is_dir()  # with a cache in place, the dataset is still checked
    shutil.copytree(cache, tmp_path / "cache" / "lesion")
    truncate(dataset / "imagesTr" / "case003_0001.nii.gz")
    rc = sap(
        "finetune",
        "cpu/finetune_scratch.yaml",
        f"data.dataset={dataset}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.fast_dev_run=true",
    )
    assert rc == 2
    assert "case003_0001.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_keeps_secrets_out(data, tmp_path: Path, monkeypatch) -> None:
    secret = "wandb-secret-key-for-the-test-0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    rc = sap(
        "finetune",
        "cpu/finetune_scratch.yaml",
        f"data.dataset={data['lesion']}",
        f"run_dir={run_dir}",
        "logger=wandb",
        "wandb.mode=offline",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    assert rc == 0
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
