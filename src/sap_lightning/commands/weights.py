"""``sap export`` and ``sap inspect-checkpoint``: move trained backbones between runs."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sap_lightning.backbones.checkpoints import (
    META_KEY,
    export_backbone,
    read_checkpoint,
    validate_meta,
)
from sap_lightning.backbones.registry import create_backbone, get_spec, list_backbones
from sap_lightning.backbones.transfer import TransferReport, transfer_weights
from sap_lightning.core.errors import CheckpointError


def add_arguments_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Lightning checkpoint of a sap training run")
    parser.add_argument("output", type=Path, help="exported backbone file to write (e.g. .pt)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it already exists"
    )


def run_export(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.overwrite:
        raise CheckpointError(f"{args.output}: already exists; pass --overwrite to replace it")
    report = export_from_checkpoint(args.checkpoint, args.output)
    meta = report.source_meta or {}
    print(
        f"exported {meta.get('backbone')} ({meta.get('task')}, {len(report.loaded)} tensors) "
        f"from {args.checkpoint} to {args.output}"
    )
    return 0


def add_arguments_inspect_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        type=Path,
        help="run folder, exported backbone, Lightning checkpoint or state dict",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_inspect_checkpoint(args: argparse.Namespace) -> int:
    from sap_lightning.core.run_layout import run_checkpoint

    summary = summarize_checkpoint(run_checkpoint(args.path))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['file']}: {summary['kind']}")
    print(
        f"tensors: {summary['tensors']} ({summary['distinct_tensors']} distinct), "
        f"parameters: {summary['parameters']:,}"
    )
    prefixes = ", ".join(f"{name} ({count})" for name, count in summary["prefixes"].items())
    print(f"top-level prefixes: {prefixes}")
    heads = summary["head_shapes"]
    print(
        "head: "
        + (", ".join(f"{key} {shape}" for key, shape in heads.items()) if heads else "not found")
    )
    meta = summary["meta"]
    print("metadata: " + ("none" if meta is None else json.dumps(meta, indent=2)))
    return 0


def export_from_checkpoint(checkpoint_path: str | Path, out_path: str | Path) -> TransferReport:
    """Export the network of a library training checkpoint, with its ``sap_meta``.

    The network is rebuilt from the metadata and loaded strictly, so an export always matches
    the architecture its metadata describes.
    """
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
