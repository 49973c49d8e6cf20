"""Training losses: a registry of segmentation losses (``loss.name``), and the three SSL terms
of Tang et al.

The paper's segmentation loss (``dice_ce``) is MONAI's ``DiceCELoss`` (its cross-entropy kept
deterministic on CUDA when ``trainer.deterministic=true``: :class:`DeterministicCrossEntropy`), whose
``include_background`` applies to the Dice term
only: the cross-entropy always covers every class, background included (docs/method.md: background
excluded from the Dice term only). ``tests/unit/test_losses.py`` checks this against MONAI's
``DiceLoss`` plus PyTorch's ``cross_entropy``. On data with nnU-Net's ``ignore`` label the loss
is wrapped in :class:`IgnoreLabel`, which leaves those voxels out of every term.

The contrastive term is NT-Xent (SimCLR) over the *global* batch: the projections of every rank
are gathered with their autograd graph, so each rank's samples see the other ranks' samples as
negatives and the gradient flows back to the rank that produced them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import (
    ContrastiveLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    FocalLoss,
    MaskedDiceLoss,
    TverskyLoss,
)
from torch import nn

from sap_lightning.config.schema import LossConfig
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.registry import Registry

ROTATION_ANGLES_DEG = (0, 90, 180, 270)
"""Rotation classes of the SSL rotation-prediction task (class k = k x 90 degrees)."""
ROTATION_PLANES = {"sagittal": (-2, -1), "coronal": (-3, -1), "axial": (-3, -2)}
"""Array axes of each anatomical plane of a (..., X, Y, Z) tensor in the canonical RAS+ frame
(X left-right, Y posterior-anterior, Z inferior-superior). Tang et al. turn a (C, H, W, D) patch
of RAS-oriented scans with ``rot90(k, (2, 3))``: about the left-right axis, the sagittal plane."""


LossFactory = Callable[[LossConfig], nn.Module]
"""``factory(cfg) -> module``; the module maps ``(logits (B, K, *spatial), labels (B, 1, ...))``
to a scalar."""

LOSSES: Registry[LossFactory] = Registry("loss", "loss.name")
register_loss = LOSSES.register
"""Decorator: ``@register_loss("name")`` on a :data:`LossFactory` (docs/extending.md)."""


def list_losses() -> list[str]:
    return LOSSES.names()


def create_loss(
    cfg: LossConfig, deep_supervision: bool = False, ignore_value: int | None = None
) -> nn.Module:
    """The segmentation loss ``cfg.name`` on softmax logits against integer labels.

    With ``deep_supervision`` the loss takes a list of logits (full resolution first) and sums
    them with MONAI's exponentially decreasing weights (1, 0.5, 0.25, ...). ``ignore_value``
    (the data declares nnU-Net's ``ignore`` label) wraps it in :class:`IgnoreLabel`.
    """
    loss = LOSSES.get(cfg.name)(cfg)
    if ignore_value is not None:
        loss = IgnoreLabel(loss, ignore_value, cfg.name)
    # DeepSupervisionLoss also accepts a single tensor and casts logits to float32, so the loss
    # is computed in full precision under mixed-precision training either way.
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss


class DeterministicCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` that, while ``torch.use_deterministic_algorithms`` is on
    (``trainer.deterministic=true``), picks each voxel's log-probability with an elementwise
    class mask instead of NLLLoss's kernel.

    CUDA has no deterministic NLLLoss for a 5-D input: a deterministic run raised at its first
    step. The mask's forward and backward are elementwise products and sums, deterministic on
    every device; equal to the stock loss within float tolerance (``tests/unit/
    test_precision_losses.py``). Class weights and label smoothing keep the stock kernel.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if (
            not torch.are_deterministic_algorithms_enabled()
            or torch.is_floating_point(target)
            or self.weight is not None
            or self.label_smoothing > 0
        ):
            return super().forward(input, target)
        return masked_cross_entropy(input, target, self.ignore_index, self.reduction)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits ``(B, K, ...)`` against class indices ``(B, ...)`` from
    elementwise operations only (see :class:`DeterministicCrossEntropy`)."""
    log_p = torch.log_softmax(logits, dim=1)
    classes = torch.arange(logits.shape[1], device=logits.device)
    mask = target.unsqueeze(1) == classes.view(1, -1, *([1] * (logits.dim() - 2)))
    per_voxel = -torch.where(mask, log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    per_voxel = per_voxel.sum(dim=1)
    if reduction == "none":
        return per_voxel
    if reduction == "sum":
        return per_voxel.sum()
    counted = (target != ignore_index).sum()
    return per_voxel.sum() / counted  # an ignored voxel's mask row is all False: it adds 0


class IgnoreLabel(nn.Module):
    """A segmentation loss to which the voxels of nnU-Net's ``ignore`` label contribute nothing.

    nnU-Net's rule: the cross-entropy averages over the annotated voxels only, and the Dice
    term sees the softmax and the one-hot target set to 0 on the ignored ones. A batch without
    an ignored voxel goes to the wrapped loss unchanged (the same value, bit for bit); one with
    some to its ``masked(logits, target, keep)`` form, which every built-in loss has.
    """

    def __init__(self, loss: nn.Module, ignore_value: int, name: str) -> None:
        super().__init__()
        if not callable(getattr(loss, "masked", None)):
            raise ConfigError(
                f"loss.name={name} cannot leave out the voxels of the dataset's 'ignore' label "
                "(it has no masked form); use dice_ce, batch_dice_ce, batch_dice_focal, "
                "batch_tversky_ce or batch_dice_topk"
            )
        self.loss = loss
        self.ignore_value = int(ignore_value)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = target != self.ignore_value
        if bool(keep.all()):
            return self.loss(logits, target)
        if not bool(keep.any()):  # nothing annotated: no signal, but a graph for the backward
            return logits.sum() * 0.0
        return self.loss.masked(logits, torch.where(keep, target, 0), keep)


def masked_dice(
    dice: DiceLoss, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``dice``'s value over the voxels ``keep`` only: MONAI's ``MaskedDiceLoss`` with the same
    settings multiplies the softmax and the one-hot target by the mask, as nnU-Net does."""
    masked = MaskedDiceLoss(
        include_background=dice.include_background,
        to_onehot_y=dice.to_onehot_y,
        softmax=dice.softmax,
        smooth_nr=dice.smooth_nr,
        smooth_dr=dice.smooth_dr,
        batch=dice.batch,
    )
    return masked(logits, target, mask=keep.to(logits.dtype))


class DiceCE(DiceCELoss):
    """MONAI's ``DiceCELoss`` with a masked form for the ``ignore`` label (:class:`IgnoreLabel`)."""

    def masked(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        dice = masked_dice(self.dice, logits, target, keep)
        ignored = torch.full_like(target, self.cross_entropy.ignore_index)
        ce = self.ce(logits, torch.where(keep, target, ignored))
        return self.lambda_dice * dice + self.lambda_ce * ce


def _dice_ce(cfg: LossConfig, batch: bool) -> nn.Module:
    loss = DiceCE(
        include_background=False,  # Dice term only; the CE term keeps the background class
        to_onehot_y=True,
        softmax=True,
        smooth_nr=cfg.smooth,
        smooth_dr=cfg.smooth,
        lambda_dice=cfg.dice_weight,
        lambda_ce=cfg.ce_weight,
        batch=batch,
    )
    stock = loss.cross_entropy
    loss.cross_entropy = DeterministicCrossEntropy(
        weight=stock.weight,
        reduction=stock.reduction,
        label_smoothing=stock.label_smoothing,
        ignore_index=stock.ignore_index,
    )
    return loss


@register_loss("dice_ce")
def dice_ce(cfg: LossConfig) -> nn.Module:
    """The paper's loss: Dice (per patch, background excluded) + cross-entropy (every class)."""
    return _dice_ce(cfg, batch=False)


@register_loss("batch_dice_ce")
def batch_dice_ce(cfg: LossConfig) -> nn.Module:
    """Dice over the whole batch + cross-entropy: a lesion-free patch no longer pins its own
    Dice term at 1, so the loss curve shows learning when half the patches have no lesion."""
    return _dice_ce(cfg, batch=True)


def batch_dice(cfg: LossConfig) -> DiceLoss:
    """MONAI's Dice over the whole batch on softmax logits, the background class left out."""
    return DiceLoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        smooth_nr=cfg.smooth,
        smooth_dr=cfg.smooth,
        batch=True,
    )


class BatchDiceFocalLoss(nn.Module):
    """Dice over the whole batch (background excluded) + softmax focal loss (every class).

    Composed from MONAI's ``DiceLoss`` and ``FocalLoss(use_softmax=True)`` rather than its
    ``DiceFocalLoss``, whose focal term is a per-channel sigmoid focal loss on softmax logits.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.dice = batch_dice(cfg)
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma)
        self.dice_weight = cfg.dice_weight
        self.focal_weight = cfg.ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.focal_weight * self.focal(
            logits, target
        )

    def masked(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Over the voxels ``keep`` only (:class:`IgnoreLabel`): the focal term's mean is taken
        over their elements, as the stock one is over all."""
        dice = masked_dice(self.dice, logits, target, keep)
        per_element = FocalLoss(
            to_onehot_y=True, use_softmax=True, gamma=self.focal.gamma, reduction="none"
        )(logits, target)
        focal = (per_element * keep).sum() / (keep.sum() * per_element.shape[1])
        return self.dice_weight * dice + self.focal_weight * focal


@register_loss("batch_dice_focal")
def batch_dice_focal(cfg: LossConfig) -> nn.Module:
    """Dice over the batch + focal loss (Lin et al., the companion of ``model.head_prior``):
    the focal term down-weights the background voxels the network already gets right, which
    otherwise outweigh a patch's few lesion voxels and hold the lesion logits down (the loss
    plateau); ``loss.ce_weight`` weighs it, ``loss.focal_gamma`` is its exponent. On the demo
    cohort it did not leave the plateau more reliably than ``batch_dice_ce`` (docs/method.md,
    "CPU recipe"), which the CPU files keep."""
    return BatchDiceFocalLoss(cfg)


class BatchTverskyCELoss(nn.Module):
    """Tversky loss over the whole batch (background excluded) + cross-entropy (every class).

    The Tversky index ``TP / (TP + alpha FP + beta FN)`` with ``alpha = 1 / (1 + b^2)`` and
    ``beta = b^2 / (1 + b^2)`` is the F-beta score written in soft counts, so the defaults
    (0.2, 0.8) train the soft voxel-wise F2, the F-score the study's endpoint uses
    (``tests/unit/test_losses.py`` checks the identity on hard predictions). Composed from
    MONAI's ``TverskyLoss`` and PyTorch's cross-entropy; MONAI has no Tversky + CE loss.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.tversky_settings = {
            "include_background": False,
            "alpha": cfg.tversky_alpha,
            "beta": cfg.tversky_beta,
            "smooth_nr": cfg.smooth,
            "smooth_dr": cfg.smooth,
            "batch": True,
        }
        self.tversky = TverskyLoss(to_onehot_y=True, softmax=True, **self.tversky_settings)
        self.cross_entropy = DeterministicCrossEntropy()
        self.tversky_weight = cfg.dice_weight
        self.ce_weight = cfg.ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.cross_entropy(logits, target[:, 0].long())
        return self.tversky_weight * self.tversky(logits, target) + self.ce_weight * ce

    def masked(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Over the voxels ``keep`` only (:class:`IgnoreLabel`): the softmax and the one-hot
        target are zeroed outside them, as :func:`masked_dice` does for the Dice term."""
        weight = keep.to(logits.dtype)
        probabilities = torch.softmax(logits, dim=1) * weight
        one_hot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1) * weight
        tversky = TverskyLoss(**self.tversky_settings)(probabilities, one_hot)
        ignored = torch.full_like(target[:, 0], self.cross_entropy.ignore_index)
        ce = self.cross_entropy(logits, torch.where(keep[:, 0], target[:, 0], ignored).long())
        return self.tversky_weight * tversky + self.ce_weight * ce


@register_loss("batch_tversky_ce")
def batch_tversky_ce(cfg: LossConfig) -> nn.Module:
    """Soft F2 over the batch (Tversky, ``loss.tversky_alpha`` / ``loss.tversky_beta``) +
    cross-entropy: a missed lesion voxel costs four times a false-positive one, as a missed
    lesion costs the F2 endpoint more than a false positive does."""
    return BatchTverskyCELoss(cfg)


class BatchDiceTopKLoss(nn.Module):
    """Dice over the whole batch (background excluded) + the mean cross-entropy of the hardest
    ``loss.topk_percent`` % of the batch's voxels (nnU-Net's ``DC_and_topk_loss``, k = 10).

    At the loss plateau a network predicts background everywhere: the voxels it gets wrong are
    the few lesion voxels and the background that looks like lesion (the mimics), and the top-k
    cross-entropy is the mean over those, where the full mean is dominated by the background it
    already gets right. Written out rather than taken from nnU-Net, which is not a dependency:
    its ``TopKLoss`` is a cross-entropy with ``reduction="none"`` and ``torch.topk``.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.dice = batch_dice(cfg)
        self.percent = cfg.topk_percent
        self.dice_weight = cfg.dice_weight
        self.ce_weight = cfg.ce_weight

    def hardest_mean(self, per_voxel: torch.Tensor) -> torch.Tensor:
        """Mean of the largest ``percent`` % of ``per_voxel`` (at least one value)."""
        count = max(1, int(per_voxel.numel() * self.percent / 100))
        return per_voxel.flatten().topk(count, sorted=False).values.mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The elementwise cross-entropy: deterministic on every device (DeterministicCrossEntropy).
        per_voxel = masked_cross_entropy(logits, target[:, 0].long(), reduction="none")
        topk = self.hardest_mean(per_voxel)
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * topk

    def masked(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Over the voxels ``keep`` only (:class:`IgnoreLabel`): the hardest ``percent`` % of
        the annotated voxels."""
        dice = masked_dice(self.dice, logits, target, keep)
        per_voxel = masked_cross_entropy(logits, target[:, 0].long(), reduction="none")
        topk = self.hardest_mean(per_voxel[keep[:, 0]])
        return self.dice_weight * dice + self.ce_weight * topk


@register_loss("batch_dice_topk")
def batch_dice_topk(cfg: LossConfig) -> nn.Module:
    """Dice over the batch + the cross-entropy of the hardest ``loss.topk_percent`` % of voxels
    (nnU-Net's top-k loss): the missed lesion voxels and the mimics carry the cross-entropy,
    not the easy background."""
    return BatchDiceTopKLoss(cfg)


def loss_in_float32(
    loss_fn: Callable[..., torch.Tensor],
    logits: torch.Tensor | list[torch.Tensor],
    target: torch.Tensor,
) -> torch.Tensor:
    """``loss_fn(logits, target)`` on float32 logits: under bfloat16 autocast the network's
    logits come out in bfloat16 (8 bits of mantissa), and a Dice over a whole batch of patches
    would sum tens of thousands of them at that precision. (The loss's own operations are not
    ones autocast lowers: softmax and cross-entropy run in float32 under it.)"""
    if isinstance(logits, list):
        return loss_fn([level.float() for level in logits], target)
    return loss_fn(logits.float(), target)


def split_deep_supervision(logits: torch.Tensor) -> list[torch.Tensor]:
    """MONAI DynUNet stacks its deep-supervision outputs on dim 1 in training mode."""
    return list(torch.unbind(logits, dim=1))


# --------------------------------------------------------------------------------------------
# Contrastive (NT-Xent) with negatives from every rank


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) of every rank along dim 0, in rank order, differentiably.

    Without an initialised process group this returns ``tensor`` itself. Every rank must pass
    the same shape (the data modules give every rank the same batch size). The backward pass sums
    the gradients of all ranks into each rank's own slice, which is what makes negatives from
    other ranks train this rank's encoder.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    # torch.distributed.nn.functional.all_gather is the documented autograd-aware collective;
    # its suggested replacement lives in the private ``_functional_collectives`` module, so the
    # public one is kept and its FutureWarning silenced here.
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(tensor.contiguous())
    return torch.cat(parts, dim=0)


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = gather_with_grad,
) -> torch.Tensor:
    """NT-Xent over the global batch: ``z_a[i]`` and ``z_b[i]`` are two views of one sample.

    Every one of the ``2N`` projections (``N`` = batch size summed over ranks) is an anchor whose
    positive is its other view and whose negatives are the other ``2N - 2`` projections. The
    value equals MONAI's ``ContrastiveLoss`` on the concatenated batch, on every rank. Each rank
    computes the full loss; with the summed backward of the gather and DDP's gradient averaging,
    the parameters receive exactly the gradient of that global loss. Computed in float32.
    With a global batch of one sample there are no negatives and the loss is 0.
    """
    if gather is not None:
        z_a, z_b = gather(z_a), gather(z_b)
    return ContrastiveLoss(temperature=temperature)(z_a.float(), z_b.float())


# --------------------------------------------------------------------------------------------
# Views for the SSL tasks (built on the tensor's device; box positions from the CPU generator)


def random_rotations(batch_size: int, generator: torch.Generator | None = None) -> list[int]:
    """Rotation class (0..3) per sample."""
    return torch.randint(0, len(ROTATION_ANGLES_DEG), (batch_size,), generator=generator).tolist()


def rotate_in_plane(
    x: torch.Tensor, classes: Sequence[int], plane: str = "sagittal"
) -> torch.Tensor:
    """Rotate sample ``i`` of ``x`` (B, C, X, Y, Z) by ``classes[i]`` x 90 degrees in ``plane``
    (a key of :data:`ROTATION_PLANES`)."""
    dims = ROTATION_PLANES[plane]
    if x.shape[dims[0]] != x.shape[dims[1]]:
        raise ValueError(
            f"a {plane} rotation needs a patch with equal sizes on array axes {dims}, got "
            f"{tuple(x.shape[2:])}"
        )
    return torch.stack([torch.rot90(s, int(k), dims=dims) for s, k in zip(x, classes)])


_BOX_DRAW = 64
"""Candidate boxes drawn per random call (one call instead of six per box)."""


def _random_boxes(
    shape: Sequence[int], generator: torch.Generator | None
) -> Iterator[tuple[slice, ...]]:
    """Endless boxes with sides between 5% and 25% of each axis (Tang et al.'s
    ``patch_rand_drop``), uniformly placed inside ``shape``."""
    size = torch.tensor(list(shape))
    low = (0.05 * size).round().clamp(min=1)
    high = (0.25 * size).floor().clamp(min=1)
    high = torch.maximum(high, low)
    while True:
        u = torch.rand(2, _BOX_DRAW, len(shape), generator=generator, dtype=torch.float64)
        sides = (low + (u[0] * (high - low + 1)).floor()).long()
        starts = (u[1] * (size - sides + 1)).floor().long()
        for start, side in zip(starts.tolist(), sides.tolist()):
            yield tuple(slice(a, a + n) for a, n in zip(start, side))


def cutout_views(
    x: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Tang et al.'s inpainting views of ``x`` (B, C, X, Y, Z) in [0, 1]; ``x`` is not modified.

    Each sample gets random boxes filled with uniform noise in [0, 1] until the boxes' volumes add
    up to ``fraction`` of the patch (overlaps counted twice, as in Tang et al.); then, when the
    batch has other samples, the same amount again filled with the content of another sample of
    the batch. The noise is drawn on ``x``'s device, or from ``generator`` on the CPU when given
    (deterministic views for validation). Box positions always come from the CPU generator, so
    no device synchronisation happens.
    """
    out = x.detach().clone()
    spatial = tuple(x.shape[2:])
    target = fraction * math.prod(spatial)
    boxes = _random_boxes(spatial, generator)
    for i in range(x.shape[0]):
        others = [j for j in range(x.shape[0]) if j != i]
        sources: list[int | None] = [None]
        if others:
            sources.append(others[int(torch.randint(len(others), (1,), generator=generator))])
        for source in sources:
            covered = 0
            while covered < target:
                box = next(boxes)
                region = (i, slice(None), *box)
                if source is None:
                    shape = out[region].shape
                    if generator is None:
                        noise = torch.rand(shape, device=x.device, dtype=x.dtype)
                    else:
                        noise = torch.rand(shape, generator=generator).to(x.device, x.dtype)
                    out[region] = noise
                else:
                    out[region] = x[(source, slice(None), *box)]
                covered += math.prod(s.stop - s.start for s in box)
    return out


def rotation_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation classifier (float32)."""
    return F.cross_entropy(logits.float(), classes)


def reconstruction_loss(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """L1 between the reconstruction of a cut-out view and the (rotated) original (float32)."""
    return F.l1_loss(reconstruction.float(), original.float())
