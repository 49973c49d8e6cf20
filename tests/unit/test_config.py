"""Configuration: composition through ``base:``, overrides, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sap_lightning.config import ExperimentConfig, from_dict, load_config, save_config, to_dict
from sap_lightning.core.errors import ConfigError
from tests.training import EXPERIMENTS


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_files_merge_in_order_and_overrides_win(tmp_path: Path) -> None:
    _write(tmp_path / "base" / "a.yaml", "seed: 1\ndata:\n  batch_size: 3\n  fold: 2\n")
    _write(tmp_path / "base" / "b.yaml", "seed: 2\ntrainer:\n  max_epochs: 7\n")
    exp = _write(
        tmp_path / "exp.yaml", "base: [base/a.yaml, base/b.yaml]\nname: x\ndata:\n  fold: 3\n"
    )
    cfg = load_config(exp, ["trainer.max_epochs=9", "model.kwargs.feature_size=12"])
    assert cfg.seed == 2  # b merged after a
    assert cfg.data.batch_size == 3  # from a, untouched by later files
    assert cfg.data.fold == 3  # the experiment file wins over its bases
    assert cfg.trainer.max_epochs == 9  # the command line wins over files
    assert cfg.model.kwargs == {"feature_size": 12}  # free-form backbone arguments


def test_types_are_coerced(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=2e-6", "data.patch_size=[16,16,16]"])
    assert cfg.optim.lr == pytest.approx(2e-6)
    assert cfg.data.patch_size == [16, 16, 16]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.patchsize=3"], "data.patchsize.*Did you mean 'patch_size'"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs"),
        (["model.init=foo"], "model.init.*scratch, sap, ssl"),
        (["logger=tensorboard"], "logger.*wandb, csv, none"),
        (["model.init=sap"], "model.pretrained"),
        (["data.fold=0"], "tuning fold"),
        (["no_equals_sign"], "key=value"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    exp = _write(tmp_path / "exp.yaml", "optim:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*optim\.learning_rate"):
        load_config(exp)


def test_base_cycle_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_plain_dict_round_trip_survives_weights_only_checkpoints(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=roundtrip", "model.kwargs.feature_size=12"])
    plain = to_dict(cfg)
    torch.save({"hyper_parameters": plain}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["hyper_parameters"]
    assert from_dict(loaded) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_pretrained_follows_init_unless_given() -> None:
    runs = "model.pretrained_by_init={sap: runs/pre, ssl: runs/ssl}"
    assert load_config(None, [runs, "model.init=sap"]).model.pretrained == "runs/pre"
    assert load_config(None, [runs, "model.init=ssl"]).model.pretrained == "runs/ssl"
    assert load_config(None, [runs, "model.init=scratch"]).model.pretrained is None
    given = load_config(None, [runs, "model.init=sap", "model.pretrained=x.ckpt"])
    assert given.model.pretrained == "x.ckpt"


def test_encoder_rate_follows_init_unless_given() -> None:
    rates = "optim.encoder_lr_by_init={sap: 2e-3, ssl: 5e-3}"
    assert (
        load_config(None, [rates, "model.init=ssl", "model.pretrained=x"]).optim.encoder_lr == 5e-3
    )
    assert load_config(None, [rates, "model.init=scratch"]).optim.encoder_lr is None
    given = load_config(
        None, [rates, "model.init=sap", "model.pretrained=x", "optim.encoder_lr=1e-4"]
    )
    assert given.optim.encoder_lr == 1e-4


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("model.pretrained_by_init={sapp: runs/pre}", "'model.pretrained_by_init' names 'sapp'"),
        ("optim.encoder_lr_by_init={sapp: 1e-3}", "'optim.encoder_lr_by_init' names 'sapp'"),
        ("optim.encoder_lr_by_init={ssl: 0}", "'optim.encoder_lr_by_init.ssl' is 0.0"),
    ],
)
def test_per_arm_mappings_refuse_unknown_arms_and_bad_rates(mapping: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [mapping])


def _effective(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything a fine-tune trains by: names, output folders and W&B labels left out, the
    encoder and decoder rates as the optimiser gets them."""
    plain = to_dict(cfg)
    for key in ("name", "output_dir", "run_dir", "wandb"):
        plain.pop(key, None)
    optim = plain.pop("optim")
    optim["encoder_lr"] = optim["encoder_lr"] or optim["lr"]
    optim["decoder_lr"] = optim["decoder_lr"] or optim["lr"]
    optim.pop("encoder_lr_by_init")
    plain["model"].pop("pretrained_by_init")
    plain["model"].pop("pretrained")
    return {**plain, "optim": optim}


@pytest.mark.parametrize("arm", ["scratch", "ssl", "sap", "mae"])
def test_the_arms_sweep_file_trains_each_arm_as_its_own_file(arm: str) -> None:
    """A sweep over ``model.init`` compares the arms with the recipe ``sap study`` gives them."""
    sweep = load_config(EXPERIMENTS / "cpu" / "finetune_arms.yaml", [f"model.init={arm}"])
    own = load_config(EXPERIMENTS / "cpu" / f"finetune_{arm}.yaml", ["model.pretrained=x"])
    assert _effective(sweep) == _effective(own)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "validation.threshold=nan",
            "'validation.threshold' is nan; it must be a finite number in (0, 1]",
        ),
        ("validation.threshold=1.01", "in (0, 1]"),
        (
            "validation.overlap=1.0",
            "'validation.overlap' is 1.0; it must be a finite number in [0, 1)",
        ),
        (
            "validation.every_n_epochs=0",
            "'validation.every_n_epochs' is 0; it must be a finite number >= 1",
        ),
        (
            "validation.tolerance_mm=-2",
            "'validation.tolerance_mm' is -2.0; it must be a finite number > 0",
        ),
        ("optim.lr=-1", "'optim.lr' is -1.0; it must be a finite number > 0"),
        ("optim.lr=inf", "'optim.lr' is inf"),
        ("optim.encoder_lr=nan", "'optim.encoder_lr' is nan"),
        (
            "optim.min_lr_ratio=2",
            "'optim.min_lr_ratio' is 2.0; it must be a finite number in [0, 1]",
        ),
        ("trainer.max_epochs=0", "'trainer.max_epochs' is 0"),
        ("data.val_fraction=1", "'data.val_fraction' is 1.0; it must be a finite number in (0, 1)"),
        ("data.target_spacing=[1,0,1]", "'data.target_spacing' is 0.0"),
        ("data.tuning_fold=9", "'data.tuning_fold' must be in 0..6"),
        (
            "validation.precision=bf16",
            "'validation.precision' is 'bf16'; valid choices: 32-true, bf16-mixed, 16-mixed",
        ),
        (
            "data.class_fraction=1.5",
            "'data.class_fraction' is 1.5; it must be a finite number in [0, 1]",
        ),
        ("loss.focal_gamma=-1", "'loss.focal_gamma' is -1.0; it must be a finite number >= 0"),
        (
            "loss.topk_percent=0",
            "'loss.topk_percent' is 0.0; it must be a finite number in (0, 100]",
        ),
    ],
)
def test_out_of_range_values_are_refused_naming_key_and_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "validation.threshold=1",  # the closed end of (0, 1]
        "validation.overlap=0",  # the closed end of [0, 1)
        "optim.warmup_epochs=0",
        "optim.encoder_lr=2e-6",
        "data.num_workers=0",
        "trainer.gradient_clip_val=0",
        "data.class_fraction=0",
    ],
)
def test_values_on_the_edge_of_their_range_are_accepted(override: str) -> None:
    key, value = override.split("=")
    cfg = load_config(None, [override])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == float(value)


def test_study_values_are_range_checked() -> None:
    from sap_lightning.config import load_study_config

    with pytest.raises(ConfigError, match=r"'predict_overlap' is 1\.0; .*\[0, 1\)"):
        load_study_config(None, ["predict_overlap=1"])
    with pytest.raises(ConfigError, match="'patients' is 0"):
        load_study_config(None, ["patients=0"])
