"""Weight transfer: export a trained backbone, load it into another network, report what moved.

This module is the only place that reads foreign weight files (``torch.load`` with
``weights_only=True``). Both pretraining arms use the same path, so the SAP / SSL comparison
is fair: SAP copies everything but the class-specific output layer (``mode="all_but_head"``),
SSL copies the encoder only (``mode="encoder"``).

Loading is strict by default, in the spirit of nnU-Net: every selected tensor of the target
model must be found in the source with a compatible shape, otherwise the error names it. Keys
are matched after removing the wrapper prefix that makes the source keys fit the model
(``net.`` of the library's LightningModules, ``module.`` of DDP, ``_orig_mod.`` of
``torch.compile``); a prefix is removed only when that produces matches, never blindly.
"""

from __future__ import annotations

import datetime as _dt
import pickle
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sap_lightning
from sap_lightning.backbones import BackboneSpec, get_spec, list_backbones, resolve_spec
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.io import atomic_path, write_json
from sap_lightning.core.tasks import TASKS

FORMAT = "sap_lightning.backbone"
FORMAT_VERSION = 1
MODES = ("all_but_head", "encoder", "full")
IN_CHANNEL_POLICIES = ("repeat_mean", "error")
META_KEY = "sap_meta"
"""Key under which the library's LightningModules store the metadata in their checkpoints."""
REQUIRED_META_KEYS = ("backbone", "backbone_kwargs", "in_channels", "out_channels", "task")
_MAX_PREFIX_DEPTH = 4  # e.g. "module.net._orig_mod." has depth 3
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------------
# Metadata


def library_versions() -> dict[str, str]:
    """Versions recorded in every export, to explain differences between runs later."""
    import monai

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "sap_lightning": sap_lightning.__version__,
    }


def to_plain(value: Any, where: str = "meta") -> Any:
    """Convert ``value`` to plain Python types (dict, list, str, int, float, bool, None).

    Metadata must load with ``torch.load(weights_only=True)`` and be writable as JSON, so numpy
    scalars and arrays, paths and mappings / sequences (OmegaConf containers included) are
    converted; any other object raises ``ConfigError`` naming where it sits.
    """
    import numpy as np

    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    # Subclasses pickle as their own class, which weights_only loading refuses: numpy.float64
    # is a float, torch.__version__ a str, enum members ints.
    for plain_type in (str, bool, int, float):
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: key {key!r} is not a string")
            plain[key] = to_plain(item, f"{where}[{key!r}]")
        return plain
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise ConfigError(f"{where} is a {type(value).__name__}; metadata must be plain Python values")


def make_backbone_meta(
    *,
    backbone: str,
    backbone_kwargs: Mapping[str, Any],
    in_channels: int,
    out_channels: int,
    task: str,
    channel_names: Sequence[str] | None = None,
    label_names: Sequence[str] | Mapping[str, int] | None = None,
    spacing: Sequence[float] | None = None,
    normalisation: Mapping[str, Any] | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata dict stored with exported backbones and under ``sap_meta`` in checkpoints.

    It is the "adaptation plan" fine-tuning checks against its own data: architecture,
    channels, labels (in class-index order), spacing and intensity normalisation. ``backbone``
    must be registered; its kwargs are stored resolved (defaults included).
    """
    if isinstance(label_names, Mapping):
        label_names = [name for name, _ in sorted(label_names.items(), key=lambda item: item[1])]
    # The resolved kwargs (defaults included) keep the file self-describing if defaults change.
    meta = {
        "backbone": backbone,
        "backbone_kwargs": get_spec(backbone).resolve_kwargs(backbone_kwargs, name=backbone),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "task": task,
        "channel_names": channel_names,
        "label_names": label_names,
        "spacing": spacing,
        "normalisation": normalisation,
        "versions": library_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }
    return validate_meta(meta)


def validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Plain-typed copy of ``meta``; missing required keys or an unknown task raise."""
    meta = to_plain(meta)
    if not isinstance(meta, dict):
        raise ConfigError(f"metadata must be a dict, got {type(meta).__name__}")
    missing = [key for key in REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ConfigError(f"metadata lacks required key(s) {missing}")
    if meta["task"] not in TASKS:
        raise ConfigError(f"metadata task {meta['task']!r} is not one of {list(TASKS)}")
    return meta


# --------------------------------------------------------------------------------------------
# Reading and writing weight files


def _unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps (its state-dict keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict on the CPU; tensors listed under two names (DynUNet) stay one shared tensor."""
    by_identity: dict[int, torch.Tensor] = {}
    state = {}
    for key, tensor in _unwrap(model).state_dict(keep_vars=True).items():
        if id(tensor) not in by_identity:
            by_identity[id(tensor)] = tensor.detach().cpu()
        state[key] = by_identity[id(tensor)]
    return state


def export_backbone(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights with ``meta`` atomically, loadable with ``weights_only=True``.

    ``model`` is the backbone network itself (not its LightningModule); ``meta`` is best built
    with :func:`make_backbone_meta`.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": _cpu_state_dict(model),
        "meta": validate_meta(meta),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a foreign file safely (``weights_only=True``, on the CPU) or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path}: cannot read the file, it is corrupt ({err})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        culprit = f" (it contains {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load, the file needs arbitrary pickled Python objects{culprit}; "
            "only tensors and plain Python values are loaded (weights_only=True), because "
            "unpickling objects can run arbitrary code. Re-save the checkpoint with plain "
            "dicts (e.g. hyper-parameters as a dict, not an OmegaConf or custom object)."
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... on bad bytes
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{path}: cannot read the file, it is truncated or corrupt "
            f"({type(err).__name__}: {first_line})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found a {type(obj).__name__}")
    return obj


@dataclass
class Checkpoint:
    """Weights read from any supported source, with the metadata that came with them."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] | None
    kind: str
    """``exported backbone``, ``lightning checkpoint``, ``state dict`` or ``module``."""
    origin: str
    """The file name, or a description of an in-memory source, for messages."""


def _interpret(obj: Mapping[str, Any], origin: str) -> Checkpoint:
    """Recognise the layout of a loaded checkpoint dict."""
    if obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{origin}: exported backbone format_version {version!r} is not supported "
                f"(this sap_lightning reads up to {FORMAT_VERSION}); upgrade sap_lightning"
            )
        state, meta, kind = obj.get("state_dict"), obj.get("meta"), "exported backbone"
    elif isinstance(obj.get("state_dict"), Mapping):
        state, meta = obj["state_dict"], obj.get(META_KEY)
        kind = "lightning checkpoint" if "pytorch-lightning_version" in obj else "checkpoint"
    elif obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        state, meta, kind = obj, None, "state dict"
    else:
        raise CheckpointError(
            f"{origin}: not a recognised checkpoint (top-level keys {sorted(obj)[:_MAX_LISTED]}); "
            "expected an exported backbone, a Lightning checkpoint or a state dict"
        )
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{origin}: the checkpoint holds no weights")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{origin}: state-dict entries that are not tensors: {_listed(not_tensors)}"
        )
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{origin}: metadata is a {type(meta).__name__}, expected a dict")
    return Checkpoint(state_dict=dict(state), meta=meta, kind=kind, origin=origin)


def read_checkpoint(source: str | Path | Mapping[str, Any] | nn.Module | Checkpoint) -> Checkpoint:
    """Weights and metadata from a file path, a (checkpoint or state) dict, or a module."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        state = dict(_unwrap(source).state_dict())
        return Checkpoint(state, None, "module", f"module {type(source).__name__}")
    if isinstance(source, Mapping):
        return _interpret(source, "in-memory state dict")
    if isinstance(source, (str, Path)):
        return _interpret(load_checkpoint_file(source), str(source))
    raise TypeError(f"cannot read weights from a {type(source).__name__}")


# --------------------------------------------------------------------------------------------
# Transfer


@dataclass
class TransferReport:
    """What :func:`transfer_weights` did, key by key (canonical target names).

    ``skipped`` keys were outside the mode's selection and keep their previous values;
    ``missing`` / ``mismatched`` are only non-empty with ``strict=False``.
    """

    source: str
    source_kind: str
    mode: str
    prefix: str
    """Prefix removed from the source keys to match the model ("" when none)."""
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unused_source_keys: list[str] = field(default_factory=list)
    """Source keys that fed no model tensor (e.g. the head in ``all_but_head``, SSL heads)."""
    source_meta: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        prefix = f", prefix {self.prefix!r} removed" if self.prefix else ""
        return (
            f"{self.mode}: loaded {len(self.loaded)}, adapted {len(self.adapted)}, "
            f"skipped {len(self.skipped)}, missing {len(self.missing)}, "
            f"mismatched {len(self.mismatched)} tensor(s) from {self.source} "
            f"({self.source_kind}{prefix}; {len(self.unused_source_keys)} source key(s) unused)"
        )

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by tensor: MONAI DynUNet lists each block under two names.

    The first name of a group (state-dict order) is its canonical name.
    """
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _match_prefix(source_keys: Sequence[str], target_keys: set[str], origin: str) -> str:
    """The wrapper prefix whose removal makes the most source keys name model tensors."""
    counts: Counter[str] = Counter()
    for key in source_keys:
        parts = key.split(".")
        for depth in range(min(_MAX_PREFIX_DEPTH, len(parts) - 1) + 1):
            prefix = "".join(part + "." for part in parts[:depth])
            if key[len(prefix) :] in target_keys:
                counts[prefix] += 1
    if not counts:
        raise CheckpointError(
            f"{origin}: no source key matches the model, with or without a wrapper prefix; "
            f"source keys look like {sorted(source_keys)[:3]}, model keys like "
            f"{sorted(target_keys)[:3]} (is it a checkpoint of this backbone?)"
        )
    best = max(counts.values())
    candidates = sorted(prefix for prefix, count in counts.items() if count == best)
    for preferred in ("", "net."):  # the bare network, then the library's LightningModules
        if preferred in candidates:
            return preferred
    if len(candidates) > 1:
        raise CheckpointError(
            f"{origin}: ambiguous source, the prefixes {candidates} each match {best} model "
            "tensors; extract the wanted state dict and pass it instead"
        )
    return candidates[0]


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Input-projection weight for ``in_channels`` inputs from one trained on another count.

    Averages the kernels over the source channels, repeats the mean for every target channel
    and rescales by ``source / target`` channels, so an image replicated over the channels
    gives the same activations as before (timm's ``adapt_input_conv`` does the same for RGB).
    """
    source_channels = weight.shape[1]
    mean = weight.mean(dim=1, keepdim=True)
    repeats = (1, in_channels) + (1,) * (weight.dim() - 2)
    return mean.repeat(*repeats) * (source_channels / in_channels)


def _selected(group: list[str], mode: str, spec: BackboneSpec | None) -> bool:
    if mode == "full":
        return True
    assert spec is not None
    if any(spec.is_head_key(name) for name in group):
        return False
    return mode == "all_but_head" or any(spec.is_encoder_key(name) for name in group)


def _check_source(
    checkpoint: Checkpoint, expected_task: str | None, expected_recipe: str | None
) -> None:
    """Refuse a source trained on another task, or by another arm's pretraining recipe."""
    if expected_task is None:
        return
    if expected_task not in TASKS:
        raise ConfigError(f"expected_task {expected_task!r} is not one of {list(TASKS)}")
    task = (checkpoint.meta or {}).get("task")
    if task is None:
        raise CheckpointError(
            f"{checkpoint.origin}: carries no task metadata, so it cannot be confirmed as a "
            f"{expected_task!r} checkpoint (export it from a sap_lightning run)"
        )
    if task != expected_task:
        raise CheckpointError(
            f"{checkpoint.origin}: is a {task!r} checkpoint, but a {expected_task!r} one is "
            "expected here"
        )
    if expected_recipe is None:
        return
    recipe = (checkpoint.meta or {}).get("recipe")
    if recipe is None:
        raise CheckpointError(
            f"{checkpoint.origin}: names no pretraining recipe (written before sap_lightning "
            f"0.3); a {expected_recipe!r} pretraining is expected: train or export it again"
        )
    if recipe != expected_recipe:
        raise CheckpointError(
            f"{checkpoint.origin}: comes from a {recipe!r} pretraining, but this arm starts "
            f"from a {expected_recipe!r} one"
        )


def _resolve_transfer_spec(
    spec: BackboneSpec | str | None, mode: str, checkpoint: Checkpoint
) -> BackboneSpec | None:
    """The spec to use; checks it against the backbone named in the source metadata."""
    source_backbone = (checkpoint.meta or {}).get("backbone")
    if spec is None:
        if source_backbone is not None:
            return get_spec(source_backbone)
        if mode != "full":
            raise ConfigError(
                f"mode {mode!r} needs the backbone spec (or name) to know which keys are "
                f"encoder and head; {checkpoint.origin} carries no backbone metadata"
            )
        return None
    resolved = resolve_spec(spec)
    if source_backbone in list_backbones() and get_spec(source_backbone) is not resolved:
        names = [name for name in list_backbones() if get_spec(name) is resolved]
        target = names[0] if names else "a different backbone"
        raise CheckpointError(
            f"{checkpoint.origin}: holds a {source_backbone!r} backbone, the model is {target}"
        )
    return resolved


def transfer_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any] | nn.Module | Checkpoint,
    mode: str = "all_but_head",
    spec: BackboneSpec | str | None = None,
    in_channel_policy: str = "repeat_mean",
    strict: bool = True,
    expected_task: str | None = None,
    expected_recipe: str | None = None,
) -> TransferReport:
    """Copy weights from ``source`` into ``model`` (in place) and report what was done.

    Args:
        model: the backbone network to initialise.
        source: exported backbone or Lightning checkpoint file, a checkpoint or state dict, or
            a module.
        mode: ``all_but_head`` (SAP: everything but the output layer), ``encoder`` (SSL),
            ``full``.
        spec: the model's :class:`BackboneSpec` or backbone name; taken from the source's
            metadata when omitted.
        in_channel_policy: ``repeat_mean`` adapts the input projection when the input channel
            counts differ (:func:`adapt_input_channels`); ``error`` refuses.
        strict: a selected model tensor that is missing from the source or has another shape
            raises ``CheckpointError`` naming it (otherwise it is reported and left as is).
        expected_task: refuse a source whose metadata names another task (or none).
        expected_recipe: with ``expected_task``, refuse a source of another pretraining recipe
            (``core/arms.py``: skeleton, contrastive, mae).
    """
    if mode not in MODES:
        raise ConfigError(f"transfer mode {mode!r} is not one of {list(MODES)}")
    if in_channel_policy not in IN_CHANNEL_POLICIES:
        raise ConfigError(
            f"in_channel_policy {in_channel_policy!r} is not one of {list(IN_CHANNEL_POLICIES)}"
        )
    model = _unwrap(model)
    checkpoint = read_checkpoint(source)
    origin = checkpoint.origin
    _check_source(checkpoint, expected_task, expected_recipe)
    spec = _resolve_transfer_spec(spec, mode, checkpoint)

    groups = _alias_groups(model)
    target_state = model.state_dict()
    if (
        spec is not None
        and mode == "all_but_head"
        and not any(k in target_state for k in spec.head_keys)
    ):
        raise ConfigError(
            f"the model has none of the spec's head keys {list(spec.head_keys)}; "
            "is the spec the model's backbone?"
        )
    prefix = _match_prefix(list(checkpoint.state_dict), set(target_state), origin)
    source = {
        key[len(prefix) :]: value
        for key, value in checkpoint.state_dict.items()
        if key.startswith(prefix)
    }

    report = TransferReport(
        source=origin,
        source_kind=checkpoint.kind,
        mode=mode,
        prefix=prefix,
        source_meta=checkpoint.meta,
    )
    new_values, consumed = _match_tensors(
        groups, source, target_state, mode, spec, in_channel_policy, report
    )
    _refuse_incomplete(report, strict, bool(new_values))

    result = model.load_state_dict(new_values, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # names come from the model
    report.unused_source_keys = [
        key
        for key in checkpoint.state_dict
        if not key.startswith(prefix) or key[len(prefix) :] not in consumed
    ]
    return report


def _match_tensors(
    groups: list[list[str]],
    source: Mapping[str, torch.Tensor],
    target_state: Mapping[str, torch.Tensor],
    mode: str,
    spec: BackboneSpec | None,
    in_channel_policy: str,
    report: TransferReport,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Pick the source tensor for every selected model tensor, adapting input projections.

    Fills the report's key lists and returns the new values (by canonical name) and the
    (prefix-free) source names they came from.
    """
    new_values: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for group in groups:
        canonical = group[0]
        if not _selected(group, mode, spec):
            report.skipped.append(canonical)
            continue
        found = next((name for name in group if name in source), None)
        if found is None:
            report.missing.append(canonical)
            continue
        value, wanted = source[found], target_state[canonical].shape
        if value.shape == wanted:
            new_values[canonical] = value
            report.loaded.append(canonical)
        elif spec is not None and _is_channel_change(group, spec, value.shape, wanted):
            if in_channel_policy == "error":
                raise CheckpointError(
                    f"{report.source}: {canonical} was trained on {value.shape[1]} input "
                    f"channel(s), the model has {wanted[1]}; use in_channel_policy="
                    "'repeat_mean' to adapt it"
                )
            new_values[canonical] = adapt_input_channels(value, wanted[1])
            report.adapted.append(canonical)
        else:
            report.mismatched.append(
                f"{canonical} (source {tuple(value.shape)}, model {tuple(wanted)})"
            )
            continue
        consumed.update(name for name in group if name in source)
    return new_values, consumed


def _refuse_incomplete(report: TransferReport, strict: bool, loaded_any: bool) -> None:
    """Strict: every selected tensor must load. Always: something must load."""
    selected = len(report.loaded) + len(report.adapted) + len(report.missing)
    selected += len(report.mismatched)
    if selected == 0:
        raise CheckpointError(
            f"mode {report.mode!r} selects no tensor of the model; check the spec"
        )
    if strict and (report.missing or report.mismatched):
        problems = []
        if report.missing:
            problems.append(f"{len(report.missing)} missing: {_listed(report.missing)}")
        if report.mismatched:
            problems.append(
                f"{len(report.mismatched)} of another shape: {_listed(report.mismatched)}"
            )
        removed = f" (source prefix {report.prefix!r} removed)" if report.prefix else ""
        raise CheckpointError(
            f"{report.source}: cannot load mode {report.mode!r} strictly; model tensors "
            + "; ".join(problems)
            + removed
        )
    if not loaded_any:
        raise CheckpointError(
            f"{report.source}: none of the {selected} tensors selected by mode "
            f"{report.mode!r} could be loaded"
        )


def _is_channel_change(
    group: list[str], spec: BackboneSpec, source_shape: torch.Size, target_shape: torch.Size
) -> bool:
    """An input projection whose shapes differ in the input-channel dimension only."""
    if not any(name in spec.input_projection_keys for name in group):
        return False
    if len(source_shape) != len(target_shape) or len(source_shape) < 2:
        return False
    return all(s == t for i, (s, t) in enumerate(zip(source_shape, target_shape)) if i != 1)


# --------------------------------------------------------------------------------------------
# Optimiser parameter groups


def param_groups(
    model: nn.Module,
    spec: BackboneSpec | str,
    encoder_lr: float,
    decoder_lr: float,
    weight_decay: float = 1e-5,
) -> list[dict[str, Any]]:
    """Two optimiser parameter groups for the paper's differential learning rates.

    ``encoder`` holds the spec's encoder parameters; ``decoder`` everything else, the output
    layer included (SAP: encoder 2e-6 / decoder 1e-5; SSL: 5e-6 / 1e-5). Every parameter is in
    exactly one group, also when a module lists it under two names.
    """
    spec = resolve_spec(spec)
    names_by_param: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in _unwrap(model).named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
        params[id(param)] = param
    encoder, decoder = [], []
    for key, names in names_by_param.items():
        is_encoder = any(spec.is_encoder_key(n) for n in names) and not any(
            spec.is_head_key(n) for n in names
        )
        (encoder if is_encoder else decoder).append(params[key])
    if not encoder:
        raise ConfigError(
            f"no model parameter matches the encoder prefixes {list(spec.encoder_prefixes)}; "
            "is the spec the model's backbone?"
        )
    return [
        {"name": "encoder", "params": encoder, "lr": encoder_lr, "weight_decay": weight_decay},
        {"name": "decoder", "params": decoder, "lr": decoder_lr, "weight_decay": weight_decay},
    ]


# --------------------------------------------------------------------------------------------
# Command-line helpers


def export_from_checkpoint(checkpoint_path: str | Path, out_path: str | Path) -> TransferReport:
    """Export the network of a library training checkpoint, with its ``sap_meta``.

    The network is rebuilt from the metadata and loaded strictly, so an export always matches
    the architecture its metadata describes.
    """
    from sap_lightning.backbones import create_backbone

    checkpoint = read_checkpoint(Path(checkpoint_path))
    meta = checkpoint.meta
    if meta is None:
        raise CheckpointError(
            f"{checkpoint_path}: has no {META_KEY!r} metadata (not written by a sap_lightning "
            "training run), so its backbone cannot be rebuilt"
        )
    meta = validate_meta(meta)
    model = create_backbone(
        meta["backbone"], meta["in_channels"], meta["out_channels"], **meta["backbone_kwargs"]
    )
    report = transfer_weights(
        model, checkpoint, mode="full", spec=meta["backbone"], in_channel_policy="error"
    )
    export_backbone(model, out_path, meta)
    return report


def _head_shapes(state: Mapping[str, torch.Tensor], meta: Mapping | None) -> dict[str, list[int]]:
    """Shapes of the output-layer tensors, found through the spec of the named backbone."""
    names = [meta["backbone"]] if meta and meta.get("backbone") in list_backbones() else []
    for name in names or list_backbones():
        shapes = {
            key: list(tensor.shape)
            for key, tensor in state.items()
            for head_key in get_spec(name).head_keys
            if key == head_key or key.endswith("." + head_key)
        }
        if shapes:
            return shapes
    return {}


def summarize_checkpoint(path: str | Path) -> dict[str, Any]:
    """What ``sap inspect-checkpoint`` prints: metadata and a summary of the keys."""
    checkpoint = read_checkpoint(Path(path))
    state = checkpoint.state_dict
    unique: dict[tuple, torch.Tensor] = {}
    for tensor in state.values():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        unique.setdefault(identity, tensor)
    return {
        "file": str(path),
        "kind": checkpoint.kind,
        "meta": checkpoint.meta,
        "tensors": len(state),
        "distinct_tensors": len(unique),
        # Values in floating-point tensors: parameters plus float buffers (norm statistics).
        "parameters": sum(t.numel() for t in unique.values() if t.is_floating_point()),
        "prefixes": dict(Counter(key.split(".")[0] for key in state)),
        "head_shapes": _head_shapes(state, checkpoint.meta),
    }
