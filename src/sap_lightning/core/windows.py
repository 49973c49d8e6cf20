"""Whole-volume inference: windows on the compute device, stitching on the CPU.

The windows run at the precision ``core/mixed_precision.py`` says the device supports.

Every place that runs a network over a whole case (validation, ``sap predict``, the benchmark)
calls :func:`predict_volume`, so whole-body volumes fit in GPU memory the same way everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from sap_lightning.core.mixed_precision import inference_autocast

log = logging.getLogger(__name__)


def round_up_to_multiple(size: Sequence[int], multiple: int) -> list[int]:
    """Round each window size up to the backbone's required input multiple (32 for Swin UNETR)."""
    return [int(-(-int(s) // multiple) * multiple) for s in size]


def sliding_window_size(
    patch_size: Sequence[int], input_multiple: int, roi_size: Sequence[int] | None = None
) -> list[int]:
    """The one rule for the whole-case inference window, used by validation, threshold tuning
    and ``sap predict``: ``roi_size`` when given, else the training patch size (as nnU-Net),
    rounded up to the backbone's input multiple."""
    return round_up_to_multiple(roi_size or patch_size, input_multiple)


@torch.no_grad()
def predict_volume(
    net: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    device: torch.device | str | None = None,
    progress: bool = False,
    channels: Sequence[int] | None = None,
    body: torch.Tensor | None = None,
    precision: str = "32-true",
) -> torch.Tensor:
    """Softmax probabilities ``(B, K, X, Y, Z)`` on the CPU for an image ``(B, C, X, Y, Z)``.

    Windows of ``roi_size`` run on ``device`` (default: the network's device) and are blended
    with Gaussian weights into a CPU tensor; volumes smaller than a window are padded by MONAI.
    The windows run at ``precision`` (:func:`inference_autocast`); the stitched logits and the
    softmax are float32 whatever it is. ``channels`` keeps
    only those classes (``(B, len(channels), ...)``), so a caller that needs the lesion
    probability alone does not hold every class of a whole-body volume. ``body`` (boolean
    ``(B, 1, X, Y, Z)``), when given, makes every voxel outside it background (probability 1 of
    class 0): ``validation.body_only``; windows without a body voxel are then not run at all
    (:class:`SkipWindowsOutsideBody`).
    """
    if device is None:
        device = next(net.parameters()).device
    if body is not None:
        _check_body_matches(body, image)
    # MONAI pads an image smaller than the window; window coordinates then index the padded
    # image, so windows are skipped only when no padding happens.
    skip = body is not None and all(s >= r for s, r in zip(image.shape[2:], roi_size))
    with inference_autocast(precision, device):
        logits = sliding_window_inference(
            image,
            roi_size=list(roi_size),
            sw_batch_size=sw_batch_size,
            predictor=SkipWindowsOutsideBody(net, body) if skip else net,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
            progress=progress,
            with_coord=skip,
        )
    assert isinstance(logits, torch.Tensor)
    probs = _softmax_(logits.float())
    if body is not None:
        keep_inside_body_(probs, body)
    if channels is not None:
        probs = probs[:, list(channels)].clone()  # a copy: the other classes are freed
    return probs


class SkipWindowsOutsideBody:
    """A sliding-window predictor that runs the network only on windows holding a body voxel.

    The other windows get zero logits. Inside the body the result is the full computation's:
    a skipped window holds no body voxel, so it blends only into voxels that
    :func:`keep_inside_body_` sets to background afterwards. In the demo's volumes one window
    in eight (32^3 at overlap 0.25) lies in air. Called by MONAI with ``with_coord=True``: each
    window's slices index the (unpadded) image and so the mask.
    """

    def __init__(self, net: nn.Module, body: torch.Tensor) -> None:
        self.net = net
        self.body = body
        self._empty: tuple[torch.Size, torch.dtype] | None = None  # (window output, dtype)

    def __call__(
        self, windows: torch.Tensor, window_slices: Sequence[Sequence[slice]]
    ) -> torch.Tensor:
        inside = torch.tensor([bool(self.body[tuple(s)].any()) for s in window_slices])
        if not bool(inside.any()):
            if self._empty is not None:
                shape, dtype = self._empty
                return torch.zeros((len(windows), *shape), dtype=dtype, device=windows.device)
            inside[0] = True  # one window tells the output's shape and dtype
        if bool(inside.all()):
            ran = self.net(windows)
            self._empty = (ran.shape[1:], ran.dtype)
            return ran
        inside = inside.to(windows.device)
        ran = self.net(windows[inside])
        self._empty = (ran.shape[1:], ran.dtype)
        out = ran.new_zeros((len(windows), *ran.shape[1:]))
        out[inside] = ran
        return out


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 in place: the stitched logits are the only whole-volume buffer (a
    whole-body volume's K-class float32 map is hundreds of MB; ``torch.softmax`` would
    allocate a second one). Same values as ``torch.softmax`` up to float32 rounding."""
    logits -= logits.amax(dim=1, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=1, keepdim=True)
    return logits


def _check_body_matches(body: torch.Tensor, volume: torch.Tensor) -> None:
    if body.shape[0] != volume.shape[0] or body.shape[2:] != volume.shape[2:]:
        raise ValueError(
            f"body mask of shape {tuple(body.shape)} does not match the volume "
            f"{tuple(volume.shape)}"
        )


def keep_inside_body_(probabilities: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """In place: class probabilities ``(B, K, X, Y, Z)`` become background (class 0 at 1, the
    others at 0) wherever the boolean ``body`` ``(B, 1, X, Y, Z)`` is False."""
    _check_body_matches(body, probabilities)
    outside = ~body.to(device=probabilities.device, dtype=torch.bool)
    probabilities[:, :1].masked_fill_(outside, 1.0)
    probabilities[:, 1:].masked_fill_(outside, 0.0)
    return probabilities
