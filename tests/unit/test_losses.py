"""Losses and SSL views: Dice + CE, deep supervision, the ``ignore`` label, NT-Xent (also across
2 ranks), views."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from monai.losses import ContrastiveLoss, DiceLoss

from sap_lightning.config.schema import LossConfig
from sap_lightning.core.errors import ConfigError
from sap_lightning.modules.losses import (
    IgnoreLabel,
    create_loss,
    cutout_views,
    gather_with_grad,
    list_losses,
    nt_xent_loss,
    random_rotations,
    rotate_in_plane,
)


def _logits_and_labels(classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 5, 4, 3, generator=generator)
    labels = torch.randint(0, classes, (2, 1, 5, 4, 3), generator=generator)
    return logits, labels


def test_dice_ce_leaves_background_out_of_the_dice_term_only() -> None:
    logits, labels = _logits_and_labels()
    cfg = LossConfig(dice_weight=0.7, ce_weight=1.3, smooth=1e-5)
    ours = create_loss(cfg)(logits, labels)

    dice_fg = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(logits, labels)
    ce_all = F.cross_entropy(logits, labels[:, 0])  # every class, background included
    assert ours.item() == pytest.approx(0.7 * dice_fg.item() + 1.3 * ce_all.item(), rel=1e-6)

    dice_all = DiceLoss(include_background=True, to_onehot_y=True, softmax=True)(logits, labels)
    assert abs(ours.item() - (0.7 * dice_all.item() + 1.3 * ce_all.item())) > 1e-4


def test_batch_dice_focal_matches_its_formula() -> None:
    """Dice over the whole batch on the lesion class plus Lin et al.'s softmax focal loss
    (mean over voxels and classes, as MONAI reduces it), written out by hand."""
    logits, labels = _logits_and_labels(classes=2)
    cfg = LossConfig(name="batch_dice_focal", dice_weight=0.7, ce_weight=1.3, focal_gamma=2.0)
    ours = create_loss(cfg)(logits, labels).item()

    p = logits.double().softmax(1)
    g = F.one_hot(labels[:, 0], 2).movedim(-1, 1).double()
    smooth = cfg.smooth
    dice = 1 - (2 * (p[:, 1] * g[:, 1]).sum() + smooth) / (p[:, 1].sum() + g[:, 1].sum() + smooth)
    p_true = (p * g).sum(1)
    focal = (-((1 - p_true) ** 2) * p_true.log()).mean() / 2  # 2 classes, one of them true
    assert ours == pytest.approx(0.7 * dice.item() + 1.3 * focal.item(), rel=1e-5)


def test_batch_tversky_term_is_one_minus_the_voxel_f2_on_hard_predictions() -> None:
    """With the default weights (0.2 on false positives, 0.8 on false negatives) the Tversky
    term of a confident prediction is 1 - F2 of its voxel counts: here TP 3, FP 2, FN 4 over a
    batch of two patches, F2 = 5 TP / (5 TP + 4 FN + FP) = 15 / 33."""
    predicted = torch.zeros(2, 1, 4, 4, 1, dtype=torch.long)
    truth = torch.zeros_like(predicted)
    predicted[0, 0, :3, 0] = 1  # three true positives ...
    truth[0, 0, :3, 0] = 1
    predicted[1, 0, 0, 1:3] = 1  # ... two false positives in the other patch ...
    truth[1, 0, 3, :4] = 1  # ... and four missed voxels there
    logits = 100.0 * F.one_hot(predicted[:, 0], 2).movedim(-1, 1).float()
    cfg = LossConfig(name="batch_tversky_ce", dice_weight=1.0, ce_weight=0.0, smooth=1e-9)
    assert create_loss(cfg)(logits, truth).item() == pytest.approx(1 - 15 / 33, abs=1e-6)
    tp, fp, fn = 3, 2, 4
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert 5 * precision * recall / (4 * precision + recall) == pytest.approx(15 / 33)


def test_batch_tversky_ce_adds_the_cross_entropy_of_every_class() -> None:
    logits, labels = _logits_and_labels(classes=2)
    tversky_only = LossConfig(name="batch_tversky_ce", dice_weight=1.0, ce_weight=0.0)
    both = LossConfig(name="batch_tversky_ce", dice_weight=1.0, ce_weight=0.6)
    ce = F.cross_entropy(logits, labels[:, 0])
    difference = create_loss(both)(logits, labels) - create_loss(tversky_only)(logits, labels)
    assert difference.item() == pytest.approx(0.6 * ce.item(), rel=1e-5)


def _plateau_lesion_share(name: str) -> float:
    """The share of the gradient of loss ``name``'s second term (its Dice term weighted 0) that
    reaches the lesion voxels on the loss plateau: background at p = 0.98 everywhere, 8 lesion
    voxels of 8192."""
    logits = torch.zeros(2, 2, 16, 16, 16)
    logits[:, 0] = 4.0
    labels = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    labels[0, 0, 7:9, 7:9, 7:9] = 1
    x = logits.requires_grad_()
    create_loss(LossConfig(name=name, dice_weight=0.0))(x, labels).backward()
    size = x.grad.abs().sum(1)  # type: ignore[union-attr]
    return (size[labels[:, 0].bool()].sum() / size.sum()).item()


def test_focal_term_leaves_the_lesion_voxels_more_of_the_gradient_than_cross_entropy() -> None:
    """The loss plateau: a network that predicts background everywhere with confidence. Cross-
    entropy's gradient then comes mostly from the many background voxels it already gets right;
    the focal term's comes mostly from the few lesion voxels it misses."""
    assert _plateau_lesion_share("batch_dice_ce") < 0.5 < _plateau_lesion_share("batch_dice_focal")


def _hardest_cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor, percent: float):
    """nnU-Net's TopKLoss written out in numpy: every voxel's cross-entropy, the largest
    ``int(n * percent / 100)`` of them, their mean."""
    x = logits.double().numpy()
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    per_voxel = -np.take_along_axis(log_p, labels.numpy(), axis=1).ravel()
    count = int(per_voxel.size * percent / 100)
    return float(np.sort(per_voxel)[-count:].mean())


@pytest.mark.parametrize("percent", [10.0, 37.5, 100.0])
def test_batch_dice_topk_adds_the_mean_cross_entropy_of_the_hardest_voxels(percent) -> None:
    logits, labels = _logits_and_labels(classes=2)
    topk_only = LossConfig(name="batch_dice_topk", dice_weight=0.0, topk_percent=percent)
    expected = _hardest_cross_entropy_by_hand(logits, labels, percent)
    assert create_loss(topk_only)(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    if percent == 100.0:  # every voxel: the plain cross-entropy
        plain = F.cross_entropy(logits, labels[:, 0]).item()
        assert create_loss(topk_only)(logits, labels).item() == pytest.approx(plain, rel=1e-6)
    both = LossConfig(name="batch_dice_topk", dice_weight=0.7, topk_percent=percent)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    assert create_loss(both)(logits, labels).item() == pytest.approx(
        0.7 * dice(logits, labels).item() + expected, rel=1e-5
    )


def test_top_k_cross_entropy_gives_the_missed_lesion_voxels_more_of_the_gradient() -> None:
    """On the plateau the top 10 % hold the 8 lesion voxels and 811 equally easy background
    ones: each voxel's gradient has size 2 |p - y| / 819, so the lesion voxels' share is
    8 (1 - p_l) / (8 (1 - p_l) + 811 p_l) with p_l = sigmoid(-4); the plain cross-entropy's
    has 8184 background voxels instead."""
    p_lesion = 1 / (1 + math.exp(4.0))
    missed = 8 * (1 - p_lesion)
    assert _plateau_lesion_share("batch_dice_topk") == pytest.approx(
        missed / (missed + 811 * p_lesion), rel=1e-4
    )
    assert _plateau_lesion_share("batch_dice_ce") == pytest.approx(
        missed / (missed + 8184 * p_lesion), rel=1e-4
    )


def test_deep_supervision_sums_levels_with_halving_weights() -> None:
    logits, labels = _logits_and_labels()
    coarse = logits.flip(1)
    cfg = LossConfig()
    single = create_loss(cfg)
    expected = single(logits, labels) + 0.5 * single(coarse, labels)
    got = create_loss(cfg, deep_supervision=True)([logits, coarse], labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


IGNORE = 255


def _with_ignored_slab(classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, classes, 6, 4, 8) logits and labels whose last four slices (z >= 4) are ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 4, 8, generator=generator)
    labels = torch.randint(0, classes, (2, 1, 6, 4, 8), generator=generator)
    labels[..., 4:] = IGNORE
    return logits, labels


@pytest.mark.parametrize("name", list_losses())
def test_ignored_voxels_contribute_nothing(name: str) -> None:
    """Any logits on the ignored slab give the same loss, no gradient reaches them, and the
    value is the stock loss of the annotated part cut out on its own (the reference: nnU-Net's
    masked Dice and cross-entropy average over the annotated voxels only)."""
    classes = 2 if name == "batch_dice_focal" else 3
    logits, labels = _with_ignored_slab(classes)
    cfg = LossConfig(name=name, dice_weight=0.7, ce_weight=1.3)
    loss = create_loss(cfg, ignore_value=IGNORE)
    scrambled = logits.clone()
    scrambled[..., 4:] = 100.0 * torch.randn_like(scrambled[..., 4:])
    leaf = logits.clone().requires_grad_(True)
    value = loss(leaf, labels)
    value.backward()
    assert loss(scrambled, labels).item() == value.item()
    assert leaf.grad is not None and torch.count_nonzero(leaf.grad[..., 4:]) == 0
    reference = create_loss(cfg)(logits[..., :4], labels[..., :4])
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("name", list_losses())
def test_without_ignored_voxels_the_loss_is_the_stock_one_bit_for_bit(name: str) -> None:
    logits, labels = _logits_and_labels(classes=2 if name == "batch_dice_focal" else 3)
    cfg = LossConfig(name=name)
    assert torch.equal(
        create_loss(cfg, ignore_value=IGNORE)(logits, labels), create_loss(cfg)(logits, labels)
    )


def test_the_deterministic_cross_entropy_leaves_ignored_voxels_out_too() -> None:
    """``trainer.deterministic=true`` computes the CE with an elementwise class mask, which
    must drop the ignored voxels from the sum and from the count alike."""
    logits, labels = _with_ignored_slab(3)
    loss = create_loss(LossConfig(), ignore_value=IGNORE)
    stock = loss(logits, labels)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = loss(logits, labels)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert deterministic.item() == pytest.approx(stock.item(), rel=1e-6)


def test_an_all_ignored_batch_has_zero_loss_and_zero_gradient() -> None:
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    labels = torch.full((1, 1, 4, 4, 4), IGNORE)
    value = create_loss(LossConfig(), ignore_value=IGNORE)(logits, labels)
    value.backward()
    assert value.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_deep_supervision_levels_leave_the_ignored_slab_out() -> None:
    """Every level (DynUNet's outputs, each at full resolution) is masked alike."""
    logits, labels = _with_ignored_slab(3)
    levels = [logits, logits.flip(1)]
    loss = create_loss(LossConfig(), deep_supervision=True, ignore_value=IGNORE)
    scrambled = [level.clone() for level in levels]
    for level in scrambled:
        level[..., 4:] = 50.0 * torch.randn_like(level[..., 4:])
    assert loss(scrambled, labels).item() == loss(levels, labels).item()
    single = create_loss(LossConfig())
    cut = single(levels[0][..., :4], labels[..., :4]) + 0.5 * single(
        levels[1][..., :4], labels[..., :4]
    )
    assert loss(levels, labels).item() == pytest.approx(cut.item(), rel=1e-6)


def test_a_loss_without_a_masked_form_is_refused_with_the_ignore_label() -> None:
    with pytest.raises(ConfigError, match=r"loss\.name=l1 cannot leave out .*'ignore'"):
        IgnoreLabel(torch.nn.L1Loss(), IGNORE, "l1")


def _nt_xent_by_hand(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
    """SimCLR's definition written out: each of 2N anchors against its 2N - 1 others."""
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        similarities = {k: z[i] @ z[k] / temperature for k in range(2 * n) if k != i}
        total -= similarities[positive] - math.log(sum(math.exp(v) for v in similarities.values()))
    return total / (2 * n)


def test_nt_xent_matches_the_definition_and_monai() -> None:
    generator = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    loss = nt_xent_loss(z_a, z_b, temperature=0.5)
    assert loss.item() == pytest.approx(_nt_xent_by_hand(z_a.numpy(), z_b.numpy(), 0.5), rel=1e-5)
    assert loss.item() == pytest.approx(ContrastiveLoss(temperature=0.5)(z_a, z_b).item())


def test_nt_xent_of_one_sample_has_no_negatives() -> None:
    loss = nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4), temperature=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------- 2 ranks

WORLD = 2
PER_RANK = 2
DIM = 6
TEMPERATURE = 0.5


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    shape = (WORLD * PER_RANK, DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z_a, z_b = _global_batch()
        own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local_a = z_a[own].clone().requires_grad_(True)
        local_b = z_b[own].clone()
        gathered = nt_xent_loss(local_a, local_b, TEMPERATURE)
        gathered.backward()
        local_only = nt_xent_loss(local_a.detach(), local_b, TEMPERATURE, gather=None)
        torch.save(
            {"loss": gathered.detach(), "local": local_only, "grad": local_a.grad},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_nt_xent_uses_negatives_and_returns_gradients_across_ranks(tmp_path: Path) -> None:
    """2 gloo processes: the loss equals the one-process loss over the concatenated batch, not
    the loss of a rank's own samples, and each rank's gradient is its share of the global one."""
    # fork: the workers need nothing but this module, already imported (spawn would re-import
    # torch and MONAI in each, which takes longer than the test).
    mp.start_processes(
        _rank_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        start_method="fork",
    )
    z_a, z_b = _global_batch()
    z_a.requires_grad_(True)
    reference = ContrastiveLoss(temperature=TEMPERATURE)(z_a, z_b)
    reference.backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == pytest.approx(reference.item(), rel=1e-5)
        assert abs(result["local"].item() - reference.item()) > 1e-3
        # Every rank computes the global loss and the gather's backward sums the ranks'
        # gradients: WORLD x the global gradient, which DDP's averaging turns back into it.
        own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(result["grad"], WORLD * z_a.grad[own], rtol=1e-4, atol=1e-6)


def test_gather_is_the_identity_without_a_process_group() -> None:
    tensor = torch.randn(2, 3)
    assert gather_with_grad(tensor) is tensor


# ---------------------------------------------------------------------------------- views


@pytest.mark.parametrize(
    ("plane", "axes"), [("sagittal", (2, 3)), ("coronal", (1, 3)), ("axial", (1, 2))]
)
def test_rotation_turns_the_two_axes_of_its_plane_only(plane, axes) -> None:
    """Sagittal is Tang et al.'s ``rot90(k, (2, 3))`` of a (C, X, Y, Z) RAS patch."""
    volume = torch.arange(2 * 1 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4, 4)
    rotated = rotate_in_plane(volume, [1, 3], plane)
    np.testing.assert_array_equal(rotated[0].numpy(), np.rot90(volume[0].numpy(), 1, axes=axes))
    np.testing.assert_array_equal(rotated[1].numpy(), np.rot90(volume[1].numpy(), 3, axes=axes))
    back = rotate_in_plane(rotated, [3, 1], plane)
    torch.testing.assert_close(back, volume)
    assert set(random_rotations(64, torch.Generator().manual_seed(0))) == {0, 1, 2, 3}
    unequal = [4, 4, 4]
    unequal[axes[1] - 1] = 5
    with pytest.raises(ValueError, match=f"{plane} rotation"):
        rotate_in_plane(torch.zeros(1, 1, *unequal), [1], plane)


def test_cutout_covers_the_fraction_and_keeps_the_input() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.full((1, 2, 16, 16, 16), 5.0)  # outside the noise range [0, 1]
    out = cutout_views(x, fraction=0.3, generator=generator)
    assert torch.equal(x, torch.full_like(x, 5.0))  # the input is not modified
    changed = (out != 5.0).all(dim=1)  # both channels of a box are replaced
    fraction = changed.float().mean().item()
    # Box volumes add up to at least 30% (overlaps count twice, as in Tang et al.), so the
    # union covers less; at least one box of side >= 1 was drawn.
    assert 0.05 < fraction <= 0.3 + (4 / 16) ** 3
    assert float(out[:, :, changed[0]].min()) >= 0.0 and float(out[:, :, changed[0]].max()) <= 1.0


def test_cutout_with_a_seeded_generator_is_reproducible_and_inpaints_from_others() -> None:
    x = torch.stack([torch.zeros(1, 8, 8, 8), torch.full((1, 8, 8, 8), 7.0)])
    first = cutout_views(x, 0.2, torch.Generator().manual_seed(3))
    second = cutout_views(x, 0.2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)
    # The second pass pastes content of the other sample: 7s appear in sample 0, 0s in sample 1.
    assert (first[0] == 7.0).any() and (first[1] == 0.0).any()
