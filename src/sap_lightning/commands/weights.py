"""``sap export`` and ``sap inspect-checkpoint``: move trained backbones between runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sap_lightning.core.errors import CheckpointError


def add_arguments_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Lightning checkpoint of a sap training run")
    parser.add_argument("output", type=Path, help="exported backbone file to write (e.g. .pt)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it already exists"
    )


def run_export(args: argparse.Namespace) -> int:
    from sap_lightning.backbones.transfer import export_from_checkpoint  # torch: only here

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
    from sap_lightning.backbones.checkpoints import summarize_checkpoint  # torch: only here
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
