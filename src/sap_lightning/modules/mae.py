"""Masked-autoencoder pretraining of a whole CNN U-Net (Wald et al., "Revisiting MAE
pre-training for 3D medical image segmentation", CVPR 2025; nnssl's ``BaseMAETrainer``).

What nnssl does for its ResEnc-L, and this module for every registered backbone:

- masking: per patch, a coarse grid of ``mae.block_size``-voxel blocks (nnssl: 16 voxels on a
  160^3 patch); ``int(mae.mask_ratio * n_blocks)`` of them (nnssl: 75%) drawn without
  replacement are set to 0 in every channel (dense masking: the convolutions see the zeros);
- the network is the backbone itself with as many outputs as image channels: its decoder output
  *is* the reconstruction, no extra head;
- loss: mean squared error over the masked voxels only (nnssl divides the sum over channels by
  the masked voxel count; here it is the mean over masked voxels and channels, a constant factor
  of the channel count).

The run is the ``mae`` arm's pretraining (``task: ssl``, ``pretraining: mae``; ``core/arms.py``):
it reads the healthy scans exactly as the contrastive recipe does (uniform patches, no labels,
fixed validation patches). The exported backbone carries task ``ssl`` and recipe ``mae`` in its
metadata; fine-tuning (``model.init: mae``) takes its encoder only, as nnssl's fine-tuning does
(stem and encoder; "the decoder is initialized from scratch"), since the decoder learnt to
paint intensities.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sap_lightning.core.case_keys import item_seed
from sap_lightning.core.errors import ConfigError
from sap_lightning.metrics.case_scores import CaseScores
from sap_lightning.modules.base import SapModule


def block_mask(
    batch_size: int,
    patch_size: tuple[int, ...],
    block_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B, 1, *patch) float mask, 1 = visible, 0 = masked: ``int(mask_ratio * n_blocks)``
    blocks of a coarse grid per patch, upsampled by repetition (nnssl ``create_blocky_mask``)."""
    grid = [size // block_size for size in patch_size]
    n_blocks = int(torch.tensor(grid).prod())
    n_masked = int(mask_ratio * n_blocks)
    masks = torch.ones(batch_size, n_blocks)
    for row in masks:
        row[torch.randperm(n_blocks, generator=generator)[:n_masked]] = 0
    coarse = masks.reshape(batch_size, 1, *grid)
    for axis in range(len(grid)):
        coarse = coarse.repeat_interleave(block_size, dim=2 + axis)
    return coarse.to(device)


def masked_mse(
    reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over the masked voxels (``mask == 0``) and all channels."""
    hidden = (1.0 - mask).expand_as(target)
    return ((reconstruction - target) ** 2 * hidden).sum() / hidden.sum().clamp_min(1.0)


class MaskedAutoencoderPretraining(SapModule):
    """Block-masked reconstruction of the input by the whole backbone (encoder and decoder).

    Validation scores the data module's fixed validation patches, each with a mask drawn from a
    generator seeded by its case and location, so ``val/loss`` is comparable between epochs and
    world sizes; it selects the "best" checkpoint.
    """

    task = "ssl"
    whole_case_validation = False
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        mae = self.cfg.mae
        patch = list(self.cfg.data.patch_size)
        if not 0.0 < mae.mask_ratio < 1.0:
            raise ConfigError(f"'mae.mask_ratio' must be in (0, 1), got {mae.mask_ratio}")
        if mae.block_size < 1 or any(size % mae.block_size for size in patch):
            raise ConfigError(
                f"'mae.block_size' {mae.block_size} must divide every 'data.patch_size' {patch}"
            )
        if int(mae.mask_ratio * self._blocks(patch)) == 0:
            raise ConfigError(
                f"'mae.mask_ratio' {mae.mask_ratio} masks no block of a {patch} patch at "
                f"'mae.block_size' {mae.block_size}; use smaller blocks"
            )
        self.val_losses = CaseScores(num_scores=1)

    def _blocks(self, patch: list[int]) -> int:
        return int(torch.tensor([size // self.cfg.mae.block_size for size in patch]).prod())

    @property
    def out_channels(self) -> int:
        """The reconstruction has the image's channels (nnssl: outputs = input channels)."""
        return int(self.data_info["in_channels"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net(image)
        # Deep supervision stacks the outputs on dim 1, full resolution first.
        return (
            out[:, 0] if self.spec.deep_supervision(self.backbone_kwargs) and self.training else out
        )

    def mae_loss(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        mae = self.cfg.mae
        mask = block_mask(
            image.shape[0],
            tuple(image.shape[2:]),
            mae.block_size,
            mae.mask_ratio,
            generator,
            image.device,
        ).to(image.dtype)
        return masked_mse(self(image * mask), image, mask)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.mae_loss(batch["image"])
        self.check_finite(loss, batch, batch_idx)
        batch_size = batch["image"].shape[0]
        self.log("train/loss_step", loss, prog_bar=True, batch_size=batch_size)
        self.log(
            "train/reconstruction",
            loss,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        for index, case_id in enumerate(batch["case_id"]):
            key = f"{case_id}@{batch['location'][index].tolist()}"
            generator = torch.Generator().manual_seed(
                (self.cfg.seed * 65_537 + item_seed(key)) % 2**63
            )
            loss = self.mae_loss(batch["image"][index : index + 1], generator)
            self.val_losses.update(key, loss.detach().reshape(1))

    def on_validation_epoch_end(self) -> None:
        means, _ = self.val_losses.compute()
        self.val_losses.reset()
        # torchmetrics squeezes a one-element result to 0-d.
        self.log_dict({"val/loss": float(means.reshape(-1)[0])}, sync_dist=True)
