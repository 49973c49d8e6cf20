"""What every LightningModule of the library shares.

- The network is built from the backbone registry and stored as ``self.net`` (checkpoint keys
  ``net.*``); the checkpoint carries a plain-dict ``sap_meta`` block (the weight-transfer
  metadata) next to Lightning's own entries, so every checkpoint loads with
  ``torch.load(weights_only=True)``.
- Hyper-parameters are two plain dicts: the resolved experiment config and the values derived
  from the data (channels, classes, label names, spacing).
- Optimiser (registered by name, ``modules/optim.py``) with optional encoder / decoder learning
  rates, and a linear warm-up + cosine schedule. With a step budget (``trainer.max_steps``, the
  CPU files) it is stepped per optimiser step (``optim.warmup_steps``, decay to
  ``optim.min_lr_ratio`` x lr at ``max_steps``), so every arm and fold gets the same schedule
  whatever its epoch length; otherwise once per epoch (``optim.warmup_epochs``, decay at
  ``trainer.max_epochs``), as the paper counts its warm-up. Both resume exactly.
- A non-finite training loss stops training on every rank at once, with an error naming the
  step, the rank and the cases.
- Whole-case validation batches stay on the CPU; sliding-window inference moves one window batch
  at a time to the module's device and stitches on the CPU.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from sap_lightning.backbones import create_backbone, get_spec, in_memory_format
from sap_lightning.backbones.checkpoints import META_KEY, export_backbone, make_backbone_meta
from sap_lightning.batches.patches import HostBatch
from sap_lightning.config import ExperimentConfig, from_dict
from sap_lightning.core.arms import Arm, get_arm, pretraining_arm
from sap_lightning.core.case_keys import item_seed
from sap_lightning.core.errors import ConfigError, SapError
from sap_lightning.core.mixed_precision import guard_small_convolutions
from sap_lightning.core.precision import inference_precision
from sap_lightning.core.windows import (
    predict_volume,
    round_up_to_multiple,
    sliding_window_size,
)
from sap_lightning.metrics.arrays import exclude_ignored
from sap_lightning.modules.losses import create_loss, loss_in_float32, split_deep_supervision
from sap_lightning.modules.optim import create_optimizer, param_groups

NORMALISATION = "percentile_1_99_clip_rescale"
"""Intensity normalisation of the inputs (per channel, whole-volume 1st-99th percentile clip,
rescaled to [0, 1]); recorded in every checkpoint and export."""

DATA_INFO_KEYS = ("in_channels", "num_classes", "channel_names", "label_names", "spacing")


def data_info_from(datamodule: Any) -> dict[str, Any]:
    """The data-derived values a module is built with, as plain Python values.

    ``ignore_value`` (the label value of nnU-Net's ``ignore`` voxels in the batches) is there
    only when the data has such voxels, so every other run's hyper-parameters stay as they were.
    """
    spacing = datamodule.spacing
    num_classes = datamodule.num_classes  # None for SSL (no labels)
    info = {
        "in_channels": int(datamodule.in_channels),
        "num_classes": None if num_classes is None else int(num_classes),
        "channel_names": [str(name) for name in datamodule.channel_names],
        "label_names": [str(name) for name in datamodule.label_names],
        "spacing": None if spacing is None else [float(s) for s in spacing],
    }
    ignore_value = getattr(datamodule, "ignore_value", None)
    if ignore_value is not None:
        info["ignore_value"] = int(ignore_value)
    return info


def warmup_cosine_factor(
    epoch: int, warmup_epochs: int, max_epochs: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier of (0-based) ``epoch`` (or optimiser step, with a step budget).

    Warm-up: ``(epoch + 1) / (warmup_epochs + 1)`` for the first ``warmup_epochs`` epochs, so the
    rate rises linearly and reaches the base rate at epoch ``warmup_epochs``; then a half cosine
    from 1 down towards ``min_lr_ratio`` at ``max_epochs`` (reached only by epochs at or past it).

    A multiplier (``LambdaLR``) rather than MONAI's ``LinearWarmupCosineAnnealingLR``: MONAI's
    starts from one absolute rate shared by all groups (0 by default, a wasted first epoch),
    while the encoder and decoder groups here must keep their own base rates.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    decay_epochs = max_epochs - warmup_epochs
    if decay_epochs <= 0:
        return 1.0
    progress = min(1.0, (epoch - warmup_epochs) / decay_epochs)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Base module


class SapModule(L.LightningModule):
    """Backbone construction, metadata, optimiser, schedule and export for every task."""

    task: ClassVar[str]
    monitor: ClassVar[str]
    """The logged validation value the "best" checkpoint follows."""
    monitor_mode: ClassVar[str] = "max"
    """``max`` when higher is better (Dice, F2), ``min`` for losses."""
    whole_case_validation: ClassVar[bool] = True
    """Validation batches are whole cases (kept on the CPU) rather than patches."""

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__()
        missing = [key for key in DATA_INFO_KEYS if key not in data_info]
        if missing:
            raise ConfigError(f"data_info lacks {missing}")
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": dict(config), "data_info": dict(data_info)})
        self.cfg: ExperimentConfig = from_dict(dict(config))
        self.data_info = dict(data_info)
        self.spec = get_spec(self.cfg.model.backbone)
        self.backbone_kwargs = self.spec.resolve_kwargs(
            self.cfg.model.kwargs, name=self.cfg.model.backbone
        )
        self.input_multiple = self.spec.input_multiple(self.backbone_kwargs)
        self._check_patch_size()
        self.net = in_memory_format(
            create_backbone(
                self.cfg.model.backbone,
                self.data_info["in_channels"],
                self.out_channels,
                **self.backbone_kwargs,
            ),
            self.cfg.model.channels_last,
        )
        guard_small_convolutions(self.net)

    # ------------------------------------------------------------------ shape and metadata

    @property
    def out_channels(self) -> int:
        num_classes = self.data_info["num_classes"]
        if num_classes is None:
            raise ConfigError(f"task {self.task!r} needs labelled data (the data has no classes)")
        return int(num_classes)

    def _check_patch_size(self) -> None:
        patch = list(self.cfg.data.patch_size)
        name = self.cfg.model.backbone
        if any(size % self.input_multiple for size in patch):
            suggestion = round_up_to_multiple(patch, self.input_multiple)
            raise ConfigError(
                f"'data.patch_size' {patch} is not a multiple of {self.input_multiple}, which "
                f"backbone {name!r} needs; use e.g. {suggestion}"
            )
        stride = self.spec.bottleneck_stride(self.backbone_kwargs)
        if min(patch) < 2 * stride:
            raise ConfigError(
                f"'data.patch_size' {patch} is too small for backbone {name!r}: it downsamples "
                f"by {stride}, and its normalisation layers need at least 2 voxels per axis at "
                f"the bottleneck, so every size must be at least {2 * stride}"
            )

    @property
    def inference_roi_size(self) -> list[int]:
        """Whole-case sliding-window size: ``validation.roi_size`` or the patch size, rounded
        up to the backbone's input multiple (stored in the metadata for ``sap predict``)."""
        return sliding_window_size(
            self.cfg.data.patch_size, self.input_multiple, self.cfg.validation.roi_size
        )

    @property
    def inference_precision(self) -> str:
        """Precision of whole-case inference (``validation.precision``, or the trainer's);
        recorded in every checkpoint for ``sap predict``."""
        return inference_precision(self.cfg.validation.precision, self.cfg.trainer.precision)

    @property
    def arm(self) -> Arm:
        """The arm this run belongs to: ``model.init`` of a lesion run, else the arm whose
        pretraining it is (recorded in the metadata, checked when fine-tuning reads it)."""
        if self.task == "lesion":
            return get_arm(self.cfg.model.init)
        return pretraining_arm(self.task, self.cfg.pretraining)

    def backbone_meta(self) -> dict[str, Any]:
        """The ``sap_meta`` block: everything fine-tuning and inference check before use."""
        info = self.data_info
        return make_backbone_meta(
            backbone=self.cfg.model.backbone,
            backbone_kwargs=self.backbone_kwargs,
            in_channels=info["in_channels"],
            out_channels=self.out_channels,
            task=self.task,
            channel_names=info["channel_names"],
            label_names=info["label_names"],
            spacing=info["spacing"],
            normalisation=NORMALISATION,
            extra={
                "patch_size": list(self.cfg.data.patch_size),
                "roi_size": self.inference_roi_size,
                "body_only": self.cfg.validation.body_only,
                "inference_precision": self.inference_precision,
                "sw_batch_size": self.cfg.validation.sw_batch_size,
                "channels_last": self.cfg.model.channels_last,
                "target_spacing": self.cfg.data.target_spacing,
                "run_name": self.cfg.name,
                "arm": self.arm.name,
                "recipe": self.arm.pretraining.recipe if self.task != "lesion" else None,
            },
        )

    def on_fit_start(self) -> None:
        # The weights are built identically everywhere (DDP also broadcasts rank 0's); from here
        # on every rank draws its own dropout masks and SSL views (global seed + rank).
        torch.manual_seed(self.cfg.seed + self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this batch's own random draws (dropout, SSL views, MAE masks) from the run's
        seed, the rank, the epoch and the batch: a run resumed from its end-of-epoch checkpoint
        then draws what the uninterrupted run drew, on every rank, whatever the generators'
        state was when it stopped. (Patches and their augmentations are seeded per patch by
        the data module.)"""
        torch.manual_seed(
            item_seed(f"{self.cfg.seed}/{self.global_rank}/{self.current_epoch}/{batch_idx}")
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.backbone_meta()

    def export_backbone(self, path: str | Path) -> Path:
        """Write ``self.net`` with its metadata (``backbone.pt``), loadable by ``transfer``."""
        return export_backbone(self.net, path, self.backbone_meta())

    # ------------------------------------------------------------------ optimisation

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        """Parameters outside ``self.net`` (task heads); trained at ``optim.lr``."""
        return []

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups, each named; frozen parameters are left out."""
        optim = self.cfg.optim
        if optim.encoder_lr is None and optim.decoder_lr is None:
            groups = [{"name": "net", "params": list(self.net.parameters()), "lr": optim.lr}]
        else:
            groups = param_groups(
                self.net,
                self.spec,
                encoder_lr=optim.lr if optim.encoder_lr is None else optim.encoder_lr,
                decoder_lr=optim.lr if optim.decoder_lr is None else optim.decoder_lr,
                weight_decay=optim.weight_decay,
            )
        groups += self.extra_parameter_groups()
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        optimizer = create_optimizer(self.parameter_groups(), optim)
        max_steps = self.cfg.trainer.max_steps
        # A step budget schedules per optimiser step; the paper's files schedule per epoch.
        by_steps = max_steps > 0
        factor = partial(
            warmup_cosine_factor,
            warmup_epochs=optim.warmup_steps if by_steps else optim.warmup_epochs,
            max_epochs=max_steps if by_steps else self.cfg.trainer.max_epochs,
            min_lr_ratio=optim.min_lr_ratio,
        )
        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        interval = "step" if by_steps else "epoch"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "frequency": 1},
        }

    def check_finite(self, loss: torch.Tensor, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Stop on a NaN / Inf loss, naming where it happened, instead of training on.

        Under DDP every rank learns whether any rank's loss is non-finite (one all-gather of a
        flag per step) and all stop at the same step: a rank that stopped alone would leave the
        others waiting in the gradient all-reduce until the process group's timeout.
        """
        finite = torch.isfinite(loss.detach()).all().reshape(1).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.all_gather(finite).reshape(-1)
        bad_ranks = [rank for rank, ok in enumerate(finite.tolist()) if not ok]
        if not bad_ranks:
            return
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}"
        advice = "Lower the learning rate, check the inputs, or use 32-true precision."
        if len(finite) > 1 and self.global_rank not in bad_ranks:
            raise SapError(
                f"training loss is not finite on rank(s) {bad_ranks} at {where}); every rank "
                f"stops (the rank(s) concerned name their cases). {advice}"
            )
        cases = ", ".join(map(str, batch.get("case_id", []))) or "unknown"
        on_rank = f" on rank {self.global_rank}" if len(finite) > 1 else ""
        raise SapError(
            f"training loss is {loss.item()}{on_rank} at {where}, cases {cases}); stopping. "
            f"{advice}"
        )

    # ------------------------------------------------------------------ whole-case batches

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Whole cases (validation, test) stay on the CPU: sliding-window inference moves one
        # window batch at a time to the device, so a whole-body volume never has to fit on it.
        # A HostBatch is no dict, so DDP's forward on CUDA does not move it either.
        if self.whole_case_validation and self._trainer is not None and not self.trainer.training:
            return HostBatch(batch) if isinstance(batch, Mapping) else batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class SegmentationModule(SapModule, ABC):
    """Dice + CE training on patches; sliding-window validation on whole cases.

    Subclasses turn each case's probabilities into scores (``update_case_metrics``) and the
    epoch's scores into logged values (``compute_case_metrics``).
    """

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        self.deep_supervision = self.spec.deep_supervision(self.backbone_kwargs)
        self.ignore_value: int | None = self.data_info.get("ignore_value")
        self.loss_fn = create_loss(
            self.cfg.loss, deep_supervision=self.deep_supervision, ignore_value=self.ignore_value
        )
        self.roi_size = self.inference_roi_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        if self.deep_supervision:
            logits = split_deep_supervision(logits)
        loss = loss_in_float32(self.loss_fn, logits, batch["label"])
        self.check_finite(loss, batch, batch_idx)
        batch_size = batch["image"].shape[0]
        self.log(
            "train/loss_step",
            loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=batch_size,
        )
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size
        )
        return loss

    def predict_case(self, image: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities (1, K, X, Y, Z) on the CPU for one whole case; with
        ``validation.body_only``, background outside ``body`` (boolean (1, 1, X, Y, Z))."""
        val = self.cfg.validation
        if val.body_only and body is None:
            raise ValueError("validation.body_only is set but no body mask was given")
        return predict_volume(
            self.net,
            image,
            self.roi_size,
            sw_batch_size=val.sw_batch_size,
            overlap=val.overlap,
            device=self.device,
            body=body if val.body_only else None,
            precision=self.inference_precision,
        )

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        probabilities = self.predict_case(batch["image"], batch.get("body"))
        label = batch["label"].cpu()
        if self.ignore_value is not None:
            ignored = label == self.ignore_value
            probabilities, label = exclude_ignored(probabilities, label, ignored)
        spacing = batch["spacing"]
        for index, case_id in enumerate(batch["case_id"]):
            case_spacing = [float(s) for s in spacing[index]]
            self.update_case_metrics(
                str(case_id), probabilities[index], label[index, 0], case_spacing
            )
            self.validated_case(
                str(case_id),
                batch["image"][index],
                probabilities[index],
                label[index, 0],
                case_spacing,
            )

    def validated_case(
        self,
        case_id: str,
        image: torch.Tensor,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing: Sequence[float],
    ) -> None:
        """Called with every validated case (its image (C, X, Y, Z) as cached, on the CPU);
        a subclass may keep something of it (the lesion module draws a few)."""

    def on_validation_epoch_end(self) -> None:
        values = self.compute_case_metrics()
        # The values are already global (synced inside the metrics); sync_dist only averages
        # identical numbers and keeps Lightning from warning about rank-local epoch values.
        self.log_dict(values, sync_dist=True)

    @abstractmethod
    def update_case_metrics(
        self,
        case_id: str,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing: Sequence[float],
    ) -> None:
        """Score one validated case (probabilities (K, X, Y, Z) and label (X, Y, Z) on the CPU)."""

    @abstractmethod
    def compute_case_metrics(self) -> dict[str, float]:
        """The epoch's validation values (global over ranks); resets the metric states."""
