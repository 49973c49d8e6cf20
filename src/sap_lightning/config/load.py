"""Load an experiment: YAML files composed through ``base:`` lists, then ``key=value`` overrides.

This is the only module that parses configuration YAML. A W&B sweep's ``${args_no_hyphens}``
produces exactly the ``key=value`` overrides accepted here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sap_lightning.config.files import resolve_config_path
from sap_lightning.config.schema import (
    LOGGERS,
    TASKS,
    ExperimentConfig,
    StudyConfig,
)
from sap_lightning.core.arms import get_arm, list_arms, pretraining_arm
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.io import write_text
from sap_lightning.core.precision import AUTOCAST_PRECISIONS, trainer_precision

BASE_KEY = "base"
STUDY_STAGES = ("report", "training")


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> DictConfig:
    """Read one YAML file with its ``base:`` files merged underneath it (in list order)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: 'base' files include each other in a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report file and reason
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    bases = node.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), (*seen, path)))
    return OmegaConf.merge(merged, node)


def _valid_keys_message(schema: DictConfig, full_key: str) -> str:
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    if not isinstance(parent, DictConfig):
        return ""
    valid = sorted(str(k) for k in parent)
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f"'{parent_key}'" if parent_key else "the top level"
    return f" Valid keys under {where}: {', '.join(valid)}.{hint}"


def _merge_checked(schema: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except ConfigKeyError as err:
        key = str(err.full_key or err.key)
        raise ConfigError(
            f"{source}: unknown config key '{key}'.{_valid_keys_message(schema, key)}"
        ) from None
    except ValidationError as err:
        raise ConfigError(
            f"{source}: bad value for '{err.full_key}': {str(err.msg).splitlines()[0]}"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None


def _check_choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' is '{value}'; valid choices: {', '.join(choices)}")


def _check_range(
    value: float | None,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a non-finite value or one outside ``[low, high]`` (ends open where asked), naming
    the key and the valid range; ``None`` (an unset optional value) passes."""
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if math.isfinite(value) and not below and not above:
        return
    if high is None:
        valid = f"{'>' if low_open else '>='} {low:g}"
    else:
        valid = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"'{key}' is {value!r}; it must be a finite number {valid}")


def _check_sizes(sizes: Sequence[int] | None, key: str, what: str = "sizes") -> None:
    if sizes is not None and (len(sizes) != 3 or min(sizes) < 1):
        raise ConfigError(f"'{key}' must be three positive {what}, got {list(sizes)}")


def _check_values(cfg: ExperimentConfig) -> None:
    """Ranges of numeric keys, checked when the config is loaded: before any folder is written,
    instead of deep inside a run (or never, as a NaN threshold would be)."""
    data, optim, val, trainer, aug = (
        cfg.data,
        cfg.optim,
        cfg.validation,
        cfg.trainer,
        cfg.data.augment,
    )
    _check_sizes(data.patch_size, "data.patch_size")
    if data.target_spacing is not None:
        if len(data.target_spacing) != 3:
            raise ConfigError("'data.target_spacing' must be three spacings in mm or null")
        for value in data.target_spacing:
            _check_range(value, "data.target_spacing", 0, low_open=True)
    for key, value, low in (
        ("data.batch_size", data.batch_size, 1),
        ("data.num_workers", data.num_workers, 0),
        ("data.samples_per_volume", data.samples_per_volume, 1),
        ("data.queue_length", data.queue_length, 1),
        ("data.patches_per_epoch", data.patches_per_epoch, 1),
        ("data.positive_margin", data.positive_margin, 0),
        ("data.n_folds", data.n_folds, 2),
        ("optim.warmup_epochs", optim.warmup_epochs, 0),
        ("optim.warmup_steps", optim.warmup_steps, 0),
        ("validation.sw_batch_size", val.sw_batch_size, 1),
        ("validation.every_n_epochs", val.every_n_epochs, 1),
        ("trainer.max_epochs", trainer.max_epochs, 1),
        ("trainer.num_nodes", trainer.num_nodes, 1),
        ("trainer.log_every_n_steps", trainer.log_every_n_steps, 1),
        ("trainer.num_sanity_val_steps", trainer.num_sanity_val_steps, -1),  # -1: every case
        ("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, 1),
    ):
        _check_range(value, key, low)
    if trainer.max_steps != -1:
        _check_range(trainer.max_steps, "trainer.max_steps", 1)  # or -1: no step budget
        if optim.warmup_steps >= trainer.max_steps:
            raise ConfigError(
                f"'optim.warmup_steps' ({optim.warmup_steps}) must be below 'trainer.max_steps' "
                f"({trainer.max_steps})"
            )
    _check_range(data.val_fraction, "data.val_fraction", 0, 1, low_open=True, high_open=True)
    _check_range(data.positive_min_scale, "data.positive_min_scale", 1)
    _check_range(data.class_fraction, "data.class_fraction", 0, 1)
    for key, value in (
        ("optim.lr", optim.lr),
        ("optim.encoder_lr", optim.encoder_lr),
        ("optim.decoder_lr", optim.decoder_lr),
        ("validation.tolerance_mm", val.tolerance_mm),
        ("ssl.temperature", cfg.ssl.temperature),
    ):
        _check_range(value, key, 0, low_open=True)
    _check_range(optim.weight_decay, "optim.weight_decay", 0)
    _check_range(optim.min_lr_ratio, "optim.min_lr_ratio", 0, 1)
    _check_range(val.threshold, "validation.threshold", 0, 1, low_open=True)
    _check_range(val.overlap, "validation.overlap", 0, 1, high_open=True)
    _check_sizes(val.roi_size, "validation.roi_size")
    for key, value in (
        ("data.augment.flip_p", aug.flip_p),
        ("data.augment.rot90_p", aug.rot90_p),
        ("data.augment.intensity_p", aug.intensity_p),
    ):
        _check_range(value, key, 0, 1)
    _check_range(aug.intensity_scale, "data.augment.intensity_scale", 0, 1, high_open=True)
    _check_range(aug.intensity_shift, "data.augment.intensity_shift", 0)
    _check_range(cfg.ssl.cutout_fraction, "ssl.cutout_fraction", 0, 1, high_open=True)
    _check_range(cfg.loss.topk_percent, "loss.topk_percent", 0, 100, low_open=True)
    for key, value in (
        ("loss.dice_weight", cfg.loss.dice_weight),
        ("loss.ce_weight", cfg.loss.ce_weight),
        ("loss.focal_gamma", cfg.loss.focal_gamma),
        ("loss.tversky_alpha", cfg.loss.tversky_alpha),
        ("loss.tversky_beta", cfg.loss.tversky_beta),
        ("ssl.rotation_weight", cfg.ssl.rotation_weight),
        ("ssl.contrastive_weight", cfg.ssl.contrastive_weight),
        ("ssl.reconstruction_weight", cfg.ssl.reconstruction_weight),
    ):
        _check_range(value, key, 0)
    _check_trainer(cfg)


def _check_trainer(cfg: ExperimentConfig) -> None:
    """The ``trainer`` keys Lightning would check only once a run has started (if at all);
    ``trainer.precision`` is stored as Lightning's own name for it."""
    trainer = cfg.trainer
    _check_range(trainer.gradient_clip_val, "trainer.gradient_clip_val", 0)
    trainer.precision = trainer_precision(trainer.precision)
    _check_range(trainer.global_batch_size, "trainer.global_batch_size", 1)
    _check_range(
        trainer.checkpoint_every_minutes, "trainer.checkpoint_every_minutes", 0, low_open=True
    )


def validate_config(cfg: ExperimentConfig) -> None:
    """Check values that types alone cannot: choices, ranges, shapes and values that must agree.

    Runs when a config is loaded (:func:`load_config`), before any run folder exists.
    """
    _check_choice(cfg.task, TASKS, "task")
    _check_choice(cfg.model.init, list_arms(), "model.init")
    if cfg.task == "lesion":
        if cfg.pretraining is not None:
            raise ConfigError(
                "'pretraining' names the arm a pretraining run trains; a lesion run's arm is "
                f"'model.init' (got pretraining={cfg.pretraining!r})"
            )
    else:
        pretraining_arm(cfg.task, cfg.pretraining)
    for mapping, by_init in (
        ("model.pretrained_by_init", cfg.model.pretrained_by_init),
        ("optim.encoder_lr_by_init", cfg.optim.encoder_lr_by_init),
    ):
        unknown = [arm for arm in by_init if arm not in list_arms()]
        if unknown:
            raise ConfigError(
                f"'{mapping}' names {', '.join(map(repr, unknown))}, not an arm; valid arms: "
                f"{', '.join(list_arms())}"
            )
    for arm, rate in cfg.optim.encoder_lr_by_init.items():
        _check_range(rate, f"optim.encoder_lr_by_init.{arm}", 0, low_open=True)
    _check_choice(cfg.logger, LOGGERS, "logger")
    if cfg.validation.precision is not None:
        _check_choice(cfg.validation.precision, list(AUTOCAST_PRECISIONS), "validation.precision")
    _check_values(cfg)
    if cfg.task == "lesion":
        if get_arm(cfg.model.init).pretraining is not None and not cfg.model.pretrained:
            raise ConfigError(
                f"'model.init' is '{cfg.model.init}' but 'model.pretrained' is not set: give the "
                "checkpoint, exported backbone or run folder to start from"
            )
        if cfg.data.fold == cfg.data.tuning_fold:
            raise ConfigError(
                f"'data.fold' ({cfg.data.fold}) is the threshold-tuning fold: it is never trained "
                f"or tested on; choose another of 0..{cfg.data.n_folds - 1}"
            )
        if not 0 <= cfg.data.fold < cfg.data.n_folds:
            raise ConfigError(f"'data.fold' must be in 0..{cfg.data.n_folds - 1}")
    if not 0 <= cfg.data.tuning_fold < cfg.data.n_folds:
        raise ConfigError(f"'data.tuning_fold' must be in 0..{cfg.data.n_folds - 1}")


OPEN_KEYS = (
    "model.kwargs",
    "model.pretrained_by_init",
    "optim.encoder_lr_by_init",
    "pretext",
    "pretraining_overrides",
    "finetune_overrides",
)
"""Free-form mappings inside the schema (backbone factory arguments, checked when it is built)."""


def _schema(kind: type = ExperimentConfig) -> DictConfig:
    schema = OmegaConf.structured(kind)
    OmegaConf.set_struct(schema, True)
    for key in OPEN_KEYS:
        node = OmegaConf.select(schema, key)
        if node is not None:
            OmegaConf.set_struct(node, False)
    return schema


def _compose(
    kind: type,
    path: str | os.PathLike | None,
    overrides: Sequence[str],
    extra_files: Sequence[str | os.PathLike] = (),
) -> Any:
    """Schema <- YAML file (with bases) <- ``extra_files`` (each with its bases) <- ``key=value``
    overrides, as a dataclass instance."""
    cfg = _schema(kind)
    for source in [*([path] if path is not None else []), *extra_files]:
        cfg = _merge_checked(cfg, _read_yaml(resolve_config_path(source), ()), str(source))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            first_line = str(err).splitlines()[0]
            raise ConfigError(
                f"command-line overrides: cannot parse a value ({first_line})"
            ) from None
        cfg = _merge_checked(cfg, dotlist, "command-line override")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    extra_files: Sequence[str | os.PathLike] = (),
) -> ExperimentConfig:
    """Compose ``path`` (with its ``base:`` files), then ``extra_files`` (a study's ``bases``)
    and ``key=value`` overrides over the schema.

    Raises ``ConfigError`` naming the file and key for unknown keys, wrong types or bad values.
    """
    result = _compose(ExperimentConfig, path, overrides, extra_files)
    assert isinstance(result, ExperimentConfig)
    if result.model.pretrained is None:
        result.model.pretrained = result.model.pretrained_by_init.get(result.model.init)
    if result.optim.encoder_lr is None:
        result.optim.encoder_lr = result.optim.encoder_lr_by_init.get(result.model.init)
    validate_config(result)
    return result


def load_study_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> StudyConfig:
    """Compose a study file (``sap study``) the same way as an experiment."""
    result = _compose(StudyConfig, path, overrides)
    assert isinstance(result, StudyConfig)
    if result.tuning_fold not in range(result.n_folds) or result.n_folds < 2:
        raise ConfigError(
            f"study: 'n_folds' must be >= 2 and 'tuning_fold' in 0..{result.n_folds - 1}"
        )
    for key, value in (("healthy", result.healthy), ("patients", result.patients)):
        _check_range(value, key, 1)
    _check_range(result.n_resamples, "n_resamples", 1)
    _check_range(result.workers, "workers", 1)
    _check_range(result.predict_overlap, "predict_overlap", 0, 1, high_open=True)
    _check_sizes(result.phantom_shape, "phantom_shape")
    if result.phantom_spacing is not None:
        if len(result.phantom_spacing) != 3:
            raise ConfigError("'phantom_spacing' must be three spacings in mm or null")
        for value in result.phantom_spacing:
            _check_range(value, "phantom_spacing", 0, low_open=True)
    _check_range(result.mimics, "mimics", 0)
    _check_range(result.repeats, "repeats", 1)
    _check_choice(result.stage, STUDY_STAGES, "stage")
    if not result.arms:
        raise ConfigError("study: 'arms' names no arm")
    if len(set(result.arms)) != len(result.arms):
        raise ConfigError(f"study: 'arms' lists an arm twice: {result.arms}")
    for arm in result.arms:
        _check_choice(arm, list_arms(), "arms")
    for key in ("pretraining_overrides", "finetune_overrides"):
        for arm, items in getattr(result, key).items():
            _check_choice(arm, result.arms, key)
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ConfigError(f"study: '{key}.{arm}' must be a list of key=value strings")
    return result


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A plain nested dict (no OmegaConf objects): safe for checkpoints loaded with
    ``weights_only=True``, for ``save_hyperparameters`` and for W&B."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from :func:`to_dict` output (checked against the schema)."""
    result = OmegaConf.to_object(
        _merge_checked(_schema(), OmegaConf.create(values), "saved config")
    )
    assert isinstance(result, ExperimentConfig)
    return result


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config next to a run (atomically)."""
    return write_text(path, to_yaml(cfg))
