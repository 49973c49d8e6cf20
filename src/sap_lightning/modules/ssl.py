"""Self-supervised encoder pretraining, the recipe of Tang et al. (CVPR 2022) for Swin UNETR.

Two views of every patch are made on the device inside the step: each is rotated by a random
multiple of 90 degrees in ``ssl.rotation_plane`` (both by the same one with
``ssl.shared_view_rotation``) and then cut out / inpainted
(:func:`~sap_lightning.modules.losses.cutout_views`). Tang et al. turn RAS-oriented patches about
the left-right axis (the sagittal plane, the default). Patches come from the cache in the
canonical RAS+ frame (``dataset/images.py``), so the sagittal plane is array axes 1 and 2 (Y-Z)
whatever voxel order the scanner stored; the training flips and quarter turns are not applied to
SSL views, so the pretext's rotation is the only geometric transform. Three heads sit on the
registered backbone's bottleneck (``spec.bottleneck``), reading what ``ssl.head_input`` says
(:meth:`ContrastivePretraining.head_inputs`):

- rotation prediction, 4 classes, cross-entropy;
- contrastive projection (``ssl.projection_dim``), NT-Xent at ``ssl.temperature`` with negatives
  gathered from every rank *with* gradients;
- reconstruction: a transposed-convolution decoder from the bottleneck back to the input size,
  L1 against the rotated view before cut-out.

The loss is ``ssl.rotation_weight * rot + ssl.contrastive_weight * contrast +
ssl.reconstruction_weight * rec``. Only the parameters on the bottleneck path are trained (for
Swin UNETR: ``swinViT``; the convolutional skip encoders and the decoder are not on it and keep
their initial values); the exported backbone holds the whole ``net`` with task ``ssl``, and
fine-tuning takes the spec's encoder from it.

Tang et al. take the rotation and contrastive features from two tokens of the last stage
(``head_input: tokens``, the paper files); the CPU files read the whole flattened bottleneck
(``flatten``): a globally pooled, instance-normalised bottleneck hardly depends on the input.
Flattened features and tokens keep positions, so the CPU and paper files give both views of a
patch the same rotation (``ssl.shared_view_rotation``); the CPU files use 48^3 patches: the tiny U-Net's 2 x 2 x 2
bottleneck of a 32^3 patch collapsed to one vector for every input within 20 steps, its
3 x 3 x 3 bottleneck of a 48^3 patch did not, and they train the heads at a tenth of the
network's rate (``ssl.head_lr``; docs/method.md, "CPU recipe").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sap_lightning.core.case_keys import item_seed
from sap_lightning.core.errors import ConfigError
from sap_lightning.dataset.layout import LESION_LABELS
from sap_lightning.metrics.case_scores import CaseScores
from sap_lightning.modules.base import SapModule
from sap_lightning.modules.losses import (
    ROTATION_ANGLES_DEG,
    ROTATION_PLANES,
    cutout_views,
    nt_xent_loss,
    random_rotations,
    reconstruction_loss,
    rotate_in_plane,
    rotation_loss,
)

VALIDATION_TERMS = ("loss", "rotation", "reconstruction")
SSL_HEAD_INPUTS = ("flatten", "tokens", "pool")

SSL_OUT_CHANNELS = len(LESION_LABELS)
"""The network's own output layer is not used by SSL; it is built with the lesion task's size,
so the exported network has the shape fine-tuning builds (the head is never transferred)."""


class ReconstructionDecoder(nn.Module):
    """Transposed convolutions (kernel 2, stride 2) from the bottleneck back to the input grid.

    One stage per factor of 2 of the backbone's total stride, halving the channels each time
    (at least ``min_channels``), then a 1x1x1 convolution to the image channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, min_channels: int = 16
    ) -> None:
        super().__init__()
        stages = stride.bit_length() - 1
        if stride < 1 or 2**stages != stride:
            raise ConfigError(
                f"the reconstruction decoder needs a power-of-two stride, got {stride}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(stages):
            out = max(channels // 2, min_channels)
            layers += [
                nn.ConvTranspose3d(channels, out, kernel_size=2, stride=2),
                nn.InstanceNorm3d(out, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv3d(channels, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ContrastivePretraining(SapModule):
    """Rotation + contrastive + inpainting pretraining of the backbone's encoder.

    Validation scores the data module's fixed validation patches, each with views drawn from a
    generator seeded by its case and location, so values are comparable between epochs and
    world sizes. Scored one patch at a time there are no negatives, so ``val/loss`` is the
    weighted rotation + reconstruction loss (mean over patches, each counted once under DDP
    padding); it selects the "best" checkpoint.
    """

    task = "ssl"
    whole_case_validation = False
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        patch = list(self.cfg.data.patch_size)
        plane = self.cfg.ssl.rotation_plane
        if plane not in ROTATION_PLANES:
            raise ConfigError(f"'ssl.rotation_plane' is {plane!r}; valid: {tuple(ROTATION_PLANES)}")
        turned = [patch[axis] for axis in ROTATION_PLANES[plane]]
        if turned[0] != turned[1]:
            axes = "".join("XYZ"[axis] for axis in ROTATION_PLANES[plane])
            raise ConfigError(
                f"SSL rotates patches in the {plane} plane ({axes}), so 'data.patch_size' needs "
                f"equal {axes[0]} and {axes[1]} sizes, got {patch}"
            )
        channels = self.spec.bottleneck_channels(self.backbone_kwargs)
        stride = self.spec.bottleneck_stride(self.backbone_kwargs)
        if any(size % stride for size in patch):
            raise ConfigError(
                f"'data.patch_size' {patch} must be a multiple of the bottleneck stride {stride}"
            )
        head_input = self.cfg.ssl.head_input
        if head_input not in SSL_HEAD_INPUTS:
            raise ConfigError(f"'ssl.head_input' is {head_input!r}; valid: {SSL_HEAD_INPUTS}")
        positions = math.prod(size // stride for size in patch)
        if head_input == "tokens" and positions < 2:
            raise ConfigError(f"ssl.head_input=tokens needs 2 bottleneck voxels, patch {patch}")
        width = channels * positions if head_input == "flatten" else channels
        self.rotation_head = nn.Linear(width, len(ROTATION_ANGLES_DEG))
        self.projection_head = nn.Linear(width, self.cfg.ssl.projection_dim)
        self.reconstruction_head = ReconstructionDecoder(
            channels, int(self.data_info["in_channels"]), stride
        )
        self._freeze_off_bottleneck_path(patch, stride)
        self.val_losses = CaseScores(num_scores=len(VALIDATION_TERMS))

    @property
    def out_channels(self) -> int:
        return SSL_OUT_CHANNELS

    def _freeze_off_bottleneck_path(self, patch: list[int], stride: int) -> None:
        """Stop gradients for the network parameters the bottleneck does not use.

        They receive no gradient in SSL, and DDP refuses parameters that never get one (unless
        told to search for them every step, which costs time).
        """
        # Twice the stride: normalisation layers need more than one voxel at the bottleneck.
        # Eval mode, so no running statistic changes and no random number is drawn.
        probe = torch.zeros(1, int(self.data_info["in_channels"]), *[2 * stride] * len(patch))
        was_training = self.net.training
        self.net.eval()
        self.spec.bottleneck(self.net, probe).sum().backward()
        self.net.train(was_training)
        for parameter in self.net.parameters():
            parameter.requires_grad_(parameter.grad is not None)
            parameter.grad = None

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        heads = [self.rotation_head, self.projection_head, self.reconstruction_head]
        params = [p for head in heads for p in head.parameters()]
        head_lr = self.cfg.ssl.head_lr
        lr = self.cfg.optim.lr if head_lr is None else head_lr
        return [{"name": "ssl_heads", "params": params, "lr": lr}]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotation logits (B, 4), projections (B, D), reconstruction (B, C, *spatial)."""
        features = self.spec.bottleneck(self.net, image)
        rotation_in, projection_in = self.head_inputs(features)
        return (
            self.rotation_head(rotation_in),
            self.projection_head(projection_in),
            self.reconstruction_head(features),
        )

    def head_inputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the rotation and contrastive heads read from the bottleneck (B, C, *spatial).

        Not the global mean by default: after a per-channel instance normalisation the spatial
        mean of every channel is fixed, so a pooled vector hardly depends on the input (cosine
        similarity >= 0.99 between different patches at initialisation) and both heads sit at
        chance while the encoder collapses. ``flatten`` keeps every bottleneck voxel in order,
        so a rotation permutes what the head reads and the rotation label is identifiable;
        ``tokens`` is Tang et al.'s choice for Swin UNETR (token 0 -> rotation, token 1 ->
        contrastive projection).
        """
        mode = self.cfg.ssl.head_input
        if mode == "pool":
            pooled = features.mean(dim=tuple(range(2, features.dim())))
            return pooled, pooled
        tokens = features.flatten(2)  # (B, C, N) in voxel order
        if mode == "tokens":
            return tokens[:, :, 0], tokens[:, :, 1]
        flat = tokens.flatten(1)
        return flat, flat

    def ssl_losses(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        contrastive: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The SSL terms and their weighted sum for a batch of patches (B, C, X, Y, Z).

        Without ``contrastive`` the term is left out (validation scores single cases, which
        have no negatives).
        """
        ssl = self.cfg.ssl
        batch_size = image.shape[0]
        rotated, classes, outputs = [], [], []
        rotation = random_rotations(batch_size, generator)
        for view_index in range(2):
            if view_index == 1 and not ssl.shared_view_rotation:
                rotation = random_rotations(batch_size, generator)
            view = rotate_in_plane(image, rotation, ssl.rotation_plane)
            rotated.append(view)
            classes.append(torch.tensor(rotation, device=image.device))
            outputs.append(self(cutout_views(view, ssl.cutout_fraction, generator)))
        (rot_a, proj_a, rec_a), (rot_b, proj_b, rec_b) = outputs
        losses = {
            "rotation": rotation_loss(torch.cat([rot_a, rot_b]), torch.cat(classes)),
            "reconstruction": reconstruction_loss(torch.cat([rec_a, rec_b]), torch.cat(rotated)),
        }
        total = (
            ssl.rotation_weight * losses["rotation"]
            + ssl.reconstruction_weight * losses["reconstruction"]
        )
        if contrastive:
            losses["contrastive"] = nt_xent_loss(proj_a, proj_b, ssl.temperature)
            total = total + ssl.contrastive_weight * losses["contrastive"]
        return {"loss": total, **losses}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.ssl_losses(batch["image"])
        self.check_finite(losses["loss"], batch, batch_idx)
        batch_size = batch["image"].shape[0]
        self.log("train/loss_step", losses["loss"], prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=batch_size,
            )
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # Fixed validation patches; each gets views from a generator seeded by its case and
        # location, so its score depends neither on the batch it came in nor on the world size.
        for index, case_id in enumerate(batch["case_id"]):
            key = f"{case_id}@{batch['location'][index].tolist()}"
            generator = torch.Generator().manual_seed(
                (self.cfg.seed * 65_537 + item_seed(key)) % 2**63
            )
            patch = batch["image"][index : index + 1]
            losses = self.ssl_losses(patch, generator, contrastive=False)
            values = torch.stack([losses[name] for name in VALIDATION_TERMS]).detach()
            self.val_losses.update(key, values)

    def on_validation_epoch_end(self) -> None:
        means, _ = self.val_losses.compute()
        self.val_losses.reset()
        self.log_dict(
            {f"val/{name}": float(v) for name, v in zip(VALIDATION_TERMS, means)}, sync_dist=True
        )
