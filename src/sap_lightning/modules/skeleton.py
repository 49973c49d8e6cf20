"""Stage 1 of SAP: segment the skeleton (background + 9 regions) on healthy WB-MRI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sap_lightning.metrics.case_scores import CaseScores, confusion_dice
from sap_lightning.modules.base import SegmentationModule


class SkeletonSegmentation(SegmentationModule):
    """Multi-class skeleton segmentation; its backbone is exported for lesion fine-tuning.

    Validation logs, as means over the validation cases of per-case Dice,
    ``val/dice_<region>`` for every region, ``val/dice_mean`` (mean over the regions) and
    ``val/dice_skeleton`` (all regions merged into one foreground, the paper's "whole
    skeleton" Dice).
    """

    task = "skeleton"
    monitor = "val/dice_mean"

    def __init__(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        self.region_names = list(self.data_info["label_names"])[1:]
        # One column per region plus the whole-skeleton Dice.
        self.val_dice = CaseScores(num_scores=len(self.region_names) + 1)

    def update_case_metrics(
        self,
        case_id: str,
        probabilities: torch.Tensor,
        label: torch.Tensor,
        spacing: Sequence[float],
    ) -> None:
        prediction = probabilities.argmax(dim=0)
        per_class = confusion_dice(prediction, label, self.out_channels)[1:]
        skeleton = confusion_dice(prediction > 0, label > 0, 2)[1:]
        self.val_dice.update(case_id, torch.cat([per_class, skeleton]))

    def compute_case_metrics(self) -> dict[str, float]:
        means, _ = self.val_dice.compute()
        self.val_dice.reset()
        values = {f"val/dice_{name}": float(v) for name, v in zip(self.region_names, means)}
        values["val/dice_mean"] = float(torch.nanmean(means[:-1]))
        values["val/dice_skeleton"] = float(means[-1])
        return values
