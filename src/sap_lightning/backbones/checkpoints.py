"""The weight files of the library: exported backbones with their metadata, Lightning checkpoints
carrying it, and the one safe way to read any of them (``torch.load`` with ``weights_only=True``).

An exported backbone (``backbone.pt``) is ``{"format", "format_version", "state_dict", "meta"}``;
the metadata is the "adaptation plan" fine-tuning checks against its own data (architecture,
channels, labels, spacing, normalisation, the task and pretraining recipe it was trained with).
Matching its keys to another network is ``backbones/transfer.py``'s job.
"""

from __future__ import annotations

import datetime as _dt
import pickle
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sap_lightning
from sap_lightning.backbones.registry import get_spec, list_backbones
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.io import atomic_path
from sap_lightning.core.tasks import TASKS

FORMAT = "sap_lightning.backbone"
FORMAT_VERSION = 2
"""2: the metadata names the arm and pretraining recipe (sap_lightning 0.3); files of version 1
are refused with their version named."""
META_KEY = "sap_meta"
"""Key under which the library's LightningModules store the metadata in their checkpoints."""
REQUIRED_META_KEYS = ("backbone", "backbone_kwargs", "in_channels", "out_channels", "task")
MAX_LISTED = 10
"""Keys named in one error message before "... and N more"."""


def listed(keys: Sequence[str]) -> str:
    """The first keys of a list for an error message, with how many more there are."""
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps (its state-dict keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict on the CPU; tensors listed under two names (DynUNet) stay one shared tensor."""
    by_identity: dict[int, torch.Tensor] = {}
    state = {}
    for key, tensor in unwrap(model).state_dict(keep_vars=True).items():
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
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{origin}: exported backbone format_version {version!r}; this sap_lightning "
                f"reads version {FORMAT_VERSION} (export the run again with it)"
            )
        state, meta, kind = obj.get("state_dict"), obj.get("meta"), "exported backbone"
    elif isinstance(obj.get("state_dict"), Mapping):
        state, meta = obj["state_dict"], obj.get(META_KEY)
        kind = "lightning checkpoint" if "pytorch-lightning_version" in obj else "checkpoint"
    elif obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        state, meta, kind = obj, None, "state dict"
    else:
        raise CheckpointError(
            f"{origin}: not a recognised checkpoint (top-level keys {sorted(obj)[:MAX_LISTED]}); "
            "expected an exported backbone, a Lightning checkpoint or a state dict"
        )
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{origin}: the checkpoint holds no weights")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{origin}: state-dict entries that are not tensors: {listed(not_tensors)}"
        )
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{origin}: metadata is a {type(meta).__name__}, expected a dict")
    return Checkpoint(state_dict=dict(state), meta=meta, kind=kind, origin=origin)


def read_checkpoint(source: str | Path | Mapping[str, Any] | nn.Module | Checkpoint) -> Checkpoint:
    """Weights and metadata from a file path, a (checkpoint or state) dict, or a module."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        state = dict(unwrap(source).state_dict())
        return Checkpoint(state, None, "module", f"module {type(source).__name__}")
    if isinstance(source, Mapping):
        return _interpret(source, "in-memory state dict")
    if isinstance(source, (str, Path)):
        return _interpret(load_checkpoint_file(source), str(source))
    raise TypeError(f"cannot read weights from a {type(source).__name__}")


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
