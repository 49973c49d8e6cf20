"""A trained network rebuilt from its checkpoint for inference, with the settings its run
validated with (window, precision, windows per pass, tuned threshold)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sap_lightning.backbones import create_backbone, get_spec, in_memory_format
from sap_lightning.backbones.checkpoints import read_checkpoint
from sap_lightning.backbones.transfer import transfer_weights
from sap_lightning.core.errors import CheckpointError
from sap_lightning.core.precision import AUTOCAST_PRECISIONS
from sap_lightning.core.run_layout import THRESHOLD_FILE, last_checkpoint_path, load_threshold
from sap_lightning.core.windows import sliding_window_size

INFERENCE_META_KEYS = ("patch_size", "inference_precision", "sw_batch_size")
"""What a checkpoint's metadata records for inference (``SapModule.backbone_meta``)."""


@dataclass
class TrainedModel:
    """A network rebuilt from its checkpoint metadata, ready for inference."""

    net: nn.Module
    meta: dict[str, Any]
    roi_size: list[int]
    threshold: float | None
    """The run's tuned threshold (``threshold.json`` in the run folder), if any."""
    source: Path
    precision: str
    """Whole-case inference precision: the run's ``validation.precision`` as recorded, or what
    the caller asks for."""
    sw_batch_size: int
    """Windows per forward pass: the run's ``validation.sw_batch_size`` as recorded, or what the
    caller asks for. Speed and memory only."""

    @property
    def task(self) -> str:
        return str(self.meta.get("task"))

    @property
    def channel_names(self) -> tuple[str, ...] | None:
        """The input channels the network was trained on, in order (``None``: not recorded)."""
        names = self.meta.get("channel_names")
        return tuple(str(name) for name in names) if names else None

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """The (canonical X, Y, Z) spacing in mm of the training data, if recorded."""
        spacing = self.meta.get("spacing")
        return tuple(float(s) for s in spacing) if spacing else None


def load_trained_model(path: str | os.PathLike, expected_task: str | None = None) -> TrainedModel:
    """Rebuild the network of a run folder, Lightning checkpoint or exported backbone.

    The architecture comes from the checkpoint's metadata, the weights are loaded strictly
    through :func:`sap_lightning.backbones.transfer.transfer_weights` (``weights_only=True``).
    """
    path = Path(path)
    threshold = None
    if path.is_dir():
        if (path / THRESHOLD_FILE).is_file():
            threshold = load_threshold(path / THRESHOLD_FILE)
        checkpoint_path = last_checkpoint_path(path)
        if not checkpoint_path.is_file():
            raise CheckpointError(f"{path}: run folder without {checkpoint_path.relative_to(path)}")
    else:
        checkpoint_path = path
    checkpoint = read_checkpoint(checkpoint_path)
    meta = checkpoint.meta
    if not meta or "backbone" not in meta:
        raise CheckpointError(
            f"{checkpoint_path}: no sap_lightning metadata: cannot tell which network to build "
            "(checkpoints written by sap pretrain/finetune and sap export carry it)"
        )
    if expected_task is not None and meta.get("task") != expected_task:
        raise CheckpointError(
            f"{checkpoint_path}: a {meta.get('task')!r} model where a {expected_task!r} model is "
            "expected"
        )
    names = meta.get("channel_names")
    if names and len(names) != int(meta["in_channels"]):
        raise CheckpointError(
            f"{checkpoint_path}: metadata names {len(names)} channels {list(names)} for a "
            f"{meta['in_channels']}-channel network"
        )
    net = create_backbone(
        meta["backbone"], meta["in_channels"], meta["out_channels"], **meta["backbone_kwargs"]
    )
    transfer_weights(net, checkpoint, mode="full")
    net = in_memory_format(net, bool(meta.get("channels_last", False))).eval()
    missing = [key for key in INFERENCE_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(
            f"{checkpoint_path}: metadata lacks {missing} (written before sap_lightning 0.3): "
            "train the run again with this version"
        )
    multiple = get_spec(meta["backbone"]).input_multiple(meta["backbone_kwargs"])
    window = sliding_window_size(meta["patch_size"], multiple, meta.get("roi_size"))
    precision = meta["inference_precision"]
    if precision not in AUTOCAST_PRECISIONS:
        raise CheckpointError(
            f"{checkpoint_path}: metadata names inference precision {precision!r}, not one of "
            f"{list(AUTOCAST_PRECISIONS)}"
        )
    sw_batch_size = meta["sw_batch_size"]
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise CheckpointError(
            f"{checkpoint_path}: metadata names {sw_batch_size!r} windows per forward pass "
            "(sw_batch_size), not a positive whole number"
        )
    return TrainedModel(net, dict(meta), window, threshold, path, precision, sw_batch_size)
