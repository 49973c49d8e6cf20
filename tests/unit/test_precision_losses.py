"""The deterministic cross-entropy that ``trainer.deterministic=true`` needs on CUDA (no
deterministic NLLLoss kernel for 5-D input): equal to the stock loss, and used only then."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from sap_lightning.config.schema import LossConfig
from sap_lightning.modules.losses import create_loss, masked_cross_entropy


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _inputs(classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 5, 4, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (2, 1, 6, 5, 4), generator=generator)
    return logits.requires_grad_(), labels


@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_cross_entropy_equals_torchs_with_its_gradient(classes: int, reduction: str):
    logits, labels = _inputs(classes)
    target = labels[:, 0].clone()
    target[0, 0, 0, 0] = -100  # ignore_index: left out of the sum and of the mean's count
    ours = masked_cross_entropy(logits, target, reduction=reduction)
    theirs = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    torch.testing.assert_close(grad_ours, grad_theirs)


@pytest.mark.parametrize("name", ["dice_ce", "batch_dice_ce"])
def test_dice_ce_equals_monais_under_deterministic_algorithms(
    name: str, deterministic, monkeypatch: pytest.MonkeyPatch
) -> None:
    logits, labels = _inputs(2, seed=1)
    reference = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
        smooth_dr=1e-5, batch=name == "batch_dice_ce",
    )(logits, labels)  # fmt: skip
    (reference_grad,) = torch.autograd.grad(reference, logits)

    def no_nll(*args, **kwargs):
        raise AssertionError("NLLLoss has no deterministic CUDA kernel; it must not be called")

    monkeypatch.setattr(F, "cross_entropy", no_nll)
    loss = create_loss(LossConfig(name=name))(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_the_stock_kernel_runs_when_determinism_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    calls = []
    original = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    logits, labels = _inputs(2)
    create_loss(LossConfig())(logits, labels)
    assert calls  # the spy above sees the stock path, so the test before it can fail


def test_deep_supervision_sums_deterministic_levels(deterministic) -> None:
    """As DynUNet gives them in training: every level at full resolution, weights 1, 0.5."""
    logits, labels = _inputs(2, seed=3)
    second, _ = _inputs(2, seed=4)
    loss = create_loss(LossConfig(), deep_supervision=True)([logits, second], labels)
    plain = create_loss(LossConfig())
    expected = plain(logits, labels) + 0.5 * plain(second, labels)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # cast to float32
