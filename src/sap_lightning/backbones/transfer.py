"""Weight transfer: load the weights of a trained network into another, report what moved.

Every arm uses this one path (``core/arms.py`` names the mode), so the comparison is fair: SAP
copies everything but the class-specific output layer (``mode="all_but_head"``), SSL and MAE
copy the encoder only (``mode="encoder"``). Files are read by ``backbones/checkpoints.py``.

Loading is strict by default, in the spirit of nnU-Net: every selected tensor of the target
model must be found in the source with a compatible shape, otherwise the error names it. Keys
are matched after removing the wrapper prefix that makes the source keys fit the model
(``net.`` of the library's LightningModules, ``module.`` of DDP, ``_orig_mod.`` of
``torch.compile``); a prefix is removed only when that produces matches, never blindly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sap_lightning.backbones.checkpoints import (
    META_KEY,
    Checkpoint,
    export_backbone,
    listed,
    read_checkpoint,
    unwrap,
    validate_meta,
)
from sap_lightning.backbones.registry import BackboneSpec, get_spec, list_backbones, resolve_spec
from sap_lightning.core.arms import TRANSFER_MODES
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.io import write_json
from sap_lightning.core.tasks import TASKS

IN_CHANNEL_POLICIES = ("by_name", "repeat_mean", "error")
NEW_CHANNEL_RULE = (
    "input channels matched by name: each pretrained channel's kernel copied to the model "
    "channel of its name, every new channel's kernel set to zero (the network computes what "
    "the pretrained one did until training moves those kernels)"
)
"""How ``in_channel_policy="by_name"`` adapts an input projection (also in the report)."""
_MAX_PREFIX_DEPTH = 4  # e.g. "module.net._orig_mod." has depth 3


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
    channels: dict[str, Any] | None = None
    """With ``in_channel_policy="by_name"`` and channels that differ: the source's and the
    model's channel names, the ``new`` ones (zero kernels) and the ``rule``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        prefix = f", prefix {self.prefix!r} removed" if self.prefix else ""
        new = ""
        if self.channels is not None and self.channels["new"]:
            new = f"; new input channel(s) {', '.join(self.channels['new'])} start at zero"
        return (
            f"{self.mode}: loaded {len(self.loaded)}, adapted {len(self.adapted)}, "
            f"skipped {len(self.skipped)}, missing {len(self.missing)}, "
            f"mismatched {len(self.mismatched)} tensor(s) from {self.source} "
            f"({self.source_kind}{prefix}; {len(self.unused_source_keys)} source key(s) unused"
            f"{new})"
        )

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())


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


def channels_by_name(
    weight: torch.Tensor, source_names: Sequence[str], model_names: Sequence[str]
) -> torch.Tensor:
    """Input-projection weight for ``model_names`` from one trained on ``source_names``
    (:data:`NEW_CHANNEL_RULE`): every source channel's kernel goes to the model channel of its
    name, a channel the source lacks gets zeros. Callers check that every source channel is
    among the model's."""
    out = weight.new_zeros((weight.shape[0], len(model_names), *weight.shape[2:]))
    for index, name in enumerate(source_names):
        out[:, list(model_names).index(name)] = weight[:, index]
    return out


def _channel_names_plan(
    origin: str, source_names: Sequence[str], model_names: Sequence[str]
) -> dict[str, Any] | None:
    """What ``by_name`` does: ``None`` when the names agree (nothing to adapt), else the report's
    ``channels`` entry; refuses in one line what it cannot do without changing the function."""
    source, model = [str(n) for n in source_names], [str(n) for n in model_names]
    if source == model:
        return None
    dropped = [name for name in source if name not in model]
    if dropped or len(set(source)) != len(source) or len(set(model)) != len(model):
        raise CheckpointError(
            f"{origin}: pretrained on input channels {source}, the model takes {model}: "
            f"by_name adapts only to added channels ({dropped or 'duplicate names'} cannot be "
            "matched); train the source on these channels or drop the data's extra ones"
        )
    new = [name for name in model if name not in source]
    return {"source": source, "model": model, "new": new, "rule": NEW_CHANNEL_RULE}


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
    channel_names: Sequence[str] | None = None,
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
        in_channel_policy: ``by_name`` matches the source's input channels (its metadata) to
            ``channel_names`` by name, copying each pretrained channel's kernel and starting
            new channels at zero (:func:`channels_by_name`; a source channel the model lacks
            is refused); ``repeat_mean`` adapts the input projection when the input channel
            counts differ (:func:`adapt_input_channels`); ``error`` refuses.
        strict: a selected model tensor that is missing from the source or has another shape
            raises ``CheckpointError`` naming it (otherwise it is reported and left as is).
        expected_task: refuse a source whose metadata names another task (or none).
        expected_recipe: with ``expected_task``, refuse a source of another pretraining recipe
            (``core/arms.py``: skeleton, contrastive, mae).
    """
    if mode not in TRANSFER_MODES:
        raise ConfigError(f"transfer mode {mode!r} is not one of {list(TRANSFER_MODES)}")
    if in_channel_policy not in IN_CHANNEL_POLICIES:
        raise ConfigError(
            f"in_channel_policy {in_channel_policy!r} is not one of {list(IN_CHANNEL_POLICIES)}"
        )
    model = unwrap(model)
    checkpoint = read_checkpoint(source)
    origin = checkpoint.origin
    spec = _resolve_transfer_spec(spec, mode, checkpoint)  # another network: the first problem
    _check_source(checkpoint, expected_task, expected_recipe)

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
    source_names = (checkpoint.meta or {}).get("channel_names")
    if in_channel_policy == "by_name" and source_names and channel_names is not None:
        report.channels = _channel_names_plan(origin, source_names, channel_names)
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
        named = report.channels
        if named is not None and spec is not None and _is_input_projection(group, spec):
            new_values[canonical] = channels_by_name(value, named["source"], named["model"])
            report.adapted.append(canonical)
        elif value.shape == wanted:
            new_values[canonical] = value
            report.loaded.append(canonical)
        elif spec is not None and _is_channel_change(group, spec, value.shape, wanted):
            if in_channel_policy != "repeat_mean":
                by_name = in_channel_policy == "by_name"
                unnamed = "; by_name needs both sides' channel names" if by_name else ""
                raise CheckpointError(
                    f"{report.source}: {canonical} was trained on {value.shape[1]} input "
                    f"channel(s), the model has {wanted[1]}{unnamed}; use in_channel_policy="
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
            problems.append(f"{len(report.missing)} missing: {listed(report.missing)}")
        if report.mismatched:
            problems.append(
                f"{len(report.mismatched)} of another shape: {listed(report.mismatched)}"
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


def _is_input_projection(group: list[str], spec: BackboneSpec) -> bool:
    return any(name in spec.input_projection_keys for name in group)


def _is_channel_change(
    group: list[str], spec: BackboneSpec, source_shape: torch.Size, target_shape: torch.Size
) -> bool:
    """An input projection whose shapes differ in the input-channel dimension only."""
    if not _is_input_projection(group, spec):
        return False
    if len(source_shape) != len(target_shape) or len(source_shape) < 2:
        return False
    return all(s == t for i, (s, t) in enumerate(zip(source_shape, target_shape)) if i != 1)


def export_from_checkpoint(checkpoint_path: str | Path, out_path: str | Path) -> TransferReport:
    """Export the network of a library training checkpoint, with its ``sap_meta``.

    The network is rebuilt from the metadata and loaded strictly, so an export always matches
    the architecture its metadata describes.
    """
    from sap_lightning.backbones.registry import create_backbone

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
