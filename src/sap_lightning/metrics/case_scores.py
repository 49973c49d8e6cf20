"""Per-case validation scores that stay right under DDP: each validated case (or patch) counted
once, whichever rank saw it and however the sampler padded the ranks; and the Dice of every
class of two label maps from one confusion matrix (the skeleton network's validation)."""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

from sap_lightning.core.case_keys import case_hash


class CaseScores(torchmetrics.Metric):
    """Mean of per-item score vectors (an item is a case, or a patch), each item counted once.

    Under DDP the validation items are split over the ranks and padded with duplicates; states
    are 1-D float tensors concatenated across ranks, and ``compute`` keeps the first entry of
    every key (``core.case_keys``: two distinct keys collide with probability about n^2 / 2^49). NaN
    scores are left out of their column's mean.
    """

    full_state_update = False

    def __init__(self, num_scores: int) -> None:
        super().__init__()
        self.num_scores = num_scores
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, key: str, scores: torch.Tensor) -> None:  # type: ignore[override]
        scores = torch.as_tensor(scores, dtype=torch.float32, device=self.device).reshape(-1)
        if scores.numel() != self.num_scores:
            raise ValueError(f"expected {self.num_scores} scores, got {scores.numel()}")
        self.keys.append(torch.tensor(case_hash(key), dtype=torch.float32, device=self.device))
        self.scores.append(scores)

    def compute(self) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        """``(mean scores (num_scores,), number of distinct items)``."""
        keys = self.keys
        if (isinstance(keys, list) and not keys) or (
            isinstance(keys, torch.Tensor) and not keys.numel()
        ):
            return torch.full((self.num_scores,), float("nan"), device=self.device), 0
        keys = dim_zero_cat(keys).reshape(-1, 2)
        scores = dim_zero_cat(self.scores).reshape(-1, self.num_scores)
        seen: set[tuple[float, float]] = set()
        first = []
        for index, key in enumerate(map(tuple, keys.tolist())):
            if key not in seen:
                seen.add(key)
                first.append(index)
        unique = scores[first]
        return torch.nanmean(unique, dim=0), len(first)


def confusion_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every class (index order) of two integer label maps of one shape.

    From one confusion matrix (a single ``bincount`` over the volume), so a whole-body volume
    with 10 classes needs no one-hot copy. A class absent from both maps scores 1.0, present in
    one only 0.0 (the project's convention, as ``metrics.functional.dice``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    confusion = torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    total = confusion.sum(dim=0) + confusion.sum(dim=1)
    dice = torch.where(total > 0, 2 * true_positive / total.clamp(min=1), torch.ones_like(total))
    return dice.float()
