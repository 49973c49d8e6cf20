"""Tiny checkpoints written from scratch for inference tests (no training needed).

Import as ``from tests.checkpoints import write_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sap_lightning.backbones import create_backbone
from sap_lightning.backbones.checkpoints import META_KEY, make_backbone_meta
from sap_lightning.dataset.layout import LESION_LABELS

INFERENCE_META = {"patch_size": [32, 32, 32], "inference_precision": "32-true", "sw_batch_size": 2}
"""What a run records for inference (``SapModule.backbone_meta``): window, precision, batch."""


def write_checkpoint(
    path: Path,
    task: str = "lesion",
    labels: dict[str, int] = LESION_LABELS,
    channel_names: Sequence[str] = ("T1", "b1000"),
    *,
    seed: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 4.0),
    edit_weights: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **meta_extra: object,
) -> Path:
    """An untrained ``unet_tiny`` network of ``task`` in the Lightning checkpoint layout.

    The weights are random on purpose (the tests check the plumbing); a random convolutional
    network is neither flip- nor transpose-equivariant, so another voxel order or channel order
    changes its output. ``edit_weights`` may change the state dict in place (e.g. NaN weights);
    ``meta_extra`` adds or replaces metadata (e.g. ``body_only=True``).
    """
    torch.manual_seed(seed)
    net = create_backbone("unet_tiny", len(channel_names), len(labels))
    meta = make_backbone_meta(
        backbone="unet_tiny",
        backbone_kwargs={},
        in_channels=len(channel_names),
        out_channels=len(labels),
        task=task,
        channel_names=list(channel_names),
        label_names=labels,
        spacing=list(spacing),
        normalisation="percentile_1_99_clip_rescale",
        extra={**INFERENCE_META, **meta_extra},
    )
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    if edit_weights is not None:
        edit_weights(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, META_KEY: meta, "pytorch-lightning_version": "2"}, path)
    return path
