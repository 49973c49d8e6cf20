"""Stage 2 of SAP and its comparators: binary lesion segmentation, initialised by an arm.

``model.init`` names a registered arm (``core/arms.py``), which says what is copied from its
pretraining run: nothing for ``scratch``; every tensor but the output layer of the skeleton
network for ``sap``; the encoder of a self-supervised network for ``ssl`` and ``mae``. The
source must come from that arm's pretraining (its metadata names the task and recipe).

Foreign weights are only read through :mod:`sap_lightning.backbones.transfer`. The differential
learning rates of the paper (SAP encoder 2e-6 / decoder 1e-5, SSL 5e-6 / 1e-5, baseline 1e-5)
come from ``optim.encoder_lr`` / ``optim.decoder_lr`` / ``optim.lr``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sap_lightning.backbones.transfer import transfer_weights
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.run_layout import BACKBONE_FILE, last_checkpoint_path
from sap_lightning.metrics import make_lesion_metrics
from sap_lightning.metrics.lesion import guarded_f2
from sap_lightning.modules.base import NORMALISATION, SegmentationModule

log = logging.getLogger(__name__)

PICTURED_CASES = 3
"""Validation cases drawn at every validation: the first this rank validates, so the same ones
every time and a W&B panel shows training progress."""

CaseDrawer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Sequence[float]], Any]
"""``(case_id, image, lesion probability, label, spacing) -> picture``; the training pipeline
sets one (``inference/pictures`` is a later stage than the modules)."""

SPACING_TOLERANCE = 0.05
"""Relative spacing difference above which fine-tuning warns that the source saw other voxels."""


def resolve_pretrained(path: str | Path) -> Path:
    """The weight file behind ``model.pretrained``: a checkpoint, an export or a run folder.

    A run folder stands for its exported backbone (``<run>/backbone.pt``).
    """
    path = Path(path)
    if path.is_dir():
        exported = path / BACKBONE_FILE
        if exported.is_file():
            return exported
        last = last_checkpoint_path(path)
        hint = f"; pass its checkpoint instead: {last}" if last.is_file() else ""
        raise CheckpointError(
            f"{path}: run folder without an exported {BACKBONE_FILE} (the pretraining "
            f"did not finish?){hint}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights not found (model.pretrained)")
    return path


def metadata_warnings(
    source_meta: Mapping[str, Any] | None, data_info: Mapping[str, Any]
) -> list[str]:
    """Differences between what the source network was trained on and the fine-tuning data."""
    if not source_meta:
        return [
            "the source carries no metadata: its channels, spacing and normalisation are unknown"
        ]
    found = []
    channels = source_meta.get("channel_names")
    if channels is not None and list(channels) != list(data_info["channel_names"]):
        new = [name for name in data_info["channel_names"] if name not in channels]
        found.append(
            f"input channels differ: source {list(channels)}, data {data_info['channel_names']}"
            + (f" (new: {', '.join(new)})" if new else "")
        )
    spacing, ours = source_meta.get("spacing"), data_info.get("spacing")
    if spacing is not None and ours is not None:
        relative = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(spacing, ours))
        if relative > SPACING_TOLERANCE:
            found.append(f"voxel spacing differs: source {list(spacing)} mm, data {list(ours)} mm")
    normalisation = source_meta.get("normalisation")
    if normalisation is not None and normalisation != NORMALISATION:
        found.append(
            f"intensity normalisation differs: source {normalisation!r}, ours {NORMALISATION!r}"
        )
    return found


class LesionSegmentation(SegmentationModule):
    """Binary lesion segmentation (2-channel softmax), initialised by ``model.init``.

    Validation logs the paper's lesion-wise metrics (:func:`sap_lightning.metrics.make_lesion_metrics`
    at ``validation.threshold``, ``connectivity`` and ``tolerance_mm``; medians over the
    validation cases, each case counted once), among them ``val/global_dice`` (Dice of the whole
    lesion mask), ``val/patient_mean_dice``, ``val/sensitivity``, ``val/precision`` and
    ``val/f2``, the paper's detection score, and ``val/f2_guarded`` (F2, or 0 when the
    predicted lesion volume is implausible: ``metrics.lesion.guarded_f2``), which selects the
    "best" checkpoint and W&B sweeps rank by (the paper uses the last one, always kept).
    """

    task = "lesion"
    monitor = "val/f2_guarded"

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        if self.out_channels != 2:
            raise ConfigError(
                f"lesion segmentation needs a binary label set (background, lesion); the data "
                f"has {self.out_channels} classes: {self.data_info['label_names']}"
            )
        if self.cfg.model.head_prior is not None:
            self._set_head_prior(self.cfg.model.head_prior)
        self.validation_writer: Callable[[LesionSegmentation], None] | None = None
        """Called with the module after each validation (before the metrics reset); the training
        pipeline sets it to write the validation as an evaluation folder."""
        self.case_drawer: CaseDrawer | None = None
        """Draws a validated case (:data:`CaseDrawer`); None draws nothing."""
        self.validation_pictures: dict[str, Any] = {}
        """This validation's pictures by case id (rank 0); the validation writer logs them."""
        self._pictured: list[str] = []
        val = self.cfg.validation
        self.val_metrics = make_lesion_metrics(
            threshold=val.threshold,
            connectivity=val.connectivity,
            tolerance_mm=val.tolerance_mm,
            prefix="val/",
        )

    # ------------------------------------------------------------------ initialisation

    def _set_head_prior(self, prior: float) -> None:
        """Output bias (0, logit(prior)): softmax gives the lesion class ``prior`` wherever the
        rest of the output layer sums to the same for both classes (at initialisation, nearly)."""
        if not 0.0 < prior < 1.0:
            raise ConfigError(f"'model.head_prior' must lie strictly between 0 and 1, got {prior}")
        biases = [key for key in self.spec.head_keys if key.endswith("bias")]
        if not biases:
            raise ConfigError(
                f"'model.head_prior' needs an output bias; backbone {self.cfg.model.backbone!r} "
                "has none"
            )
        bias = self.net.get_parameter(biases[0])
        with torch.no_grad():
            bias.copy_(torch.tensor([0.0, math.log(prior / (1.0 - prior))]))

    def initialise_from_pretrained(self) -> dict[str, Any]:
        """Load the ``model.pretrained`` weights as ``model.init`` says; returns the report.

        The report is :class:`sap_lightning.backbones.transfer.TransferReport` as a dict, plus ``init``,
        the resolved ``pretrained_file`` and ``warnings`` on metadata that disagrees with the
        data. An arm without pretraining loads nothing and reports so.
        """
        model_cfg = self.cfg.model
        arm = self.arm
        if arm.pretraining is None:
            return {"init": arm.name, "pretrained_file": None, "warnings": []}
        if not model_cfg.pretrained:
            raise ConfigError(
                f"'model.init' is {model_cfg.init!r} but 'model.pretrained' is not set"
            )
        assert arm.transfer is not None
        source = resolve_pretrained(model_cfg.pretrained)
        report = transfer_weights(
            self.net,
            source,
            mode=arm.transfer,
            spec=self.spec,
            in_channel_policy=model_cfg.in_channel_policy,
            channel_names=self.data_info["channel_names"],
            strict=True,
            expected_task=arm.pretraining.task,
            expected_recipe=arm.pretraining.recipe,
        )
        warnings = metadata_warnings(report.source_meta, self.data_info)
        for warning in warnings:
            log.warning("%s: %s", source, warning)
        log.info("init %s: %s", model_cfg.init, report.summary())
        return {
            "init": model_cfg.init,
            "pretrained_file": str(source),
            "warnings": warnings,
            **report.to_dict(),
        }

    # ------------------------------------------------------------------ validation

    def update_case_metrics(
        self,
        case_id: str,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing: Sequence[float],
    ) -> None:
        self.val_metrics.update(probabilities[1], label, spacing=spacing, case_id=case_id)

    def validated_case(
        self,
        case_id: str,
        image: torch.Tensor,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing: Sequence[float],
    ) -> None:
        """Draw the first :data:`PICTURED_CASES` cases rank 0 validates, every validation."""
        if self.case_drawer is None or self.global_rank != 0 or self.trainer.sanity_checking:
            return
        if case_id not in self._pictured:
            if len(self._pictured) >= PICTURED_CASES:
                return
            self._pictured.append(case_id)
        self.validation_pictures[case_id] = self.case_drawer(
            case_id, image, probabilities[1], label, spacing
        )

    def compute_case_metrics(self) -> dict[str, float]:
        values = {name: float(value) for name, value in self.val_metrics.compute().items()}
        values["val/f2_guarded"] = guarded_f2(values["val/f2"], values["val/volume_ratio"])
        if self.validation_writer is not None and not self.trainer.sanity_checking:
            # Every rank takes part: the writer gathers the per-case tables from all ranks.
            self.validation_writer(self)
        self.val_metrics.reset()
        self.validation_pictures = {}
        return values
