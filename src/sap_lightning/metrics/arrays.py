"""What every lesion metric accepts: numpy arrays or torch tensors (any device) of one case,
(X, Y, Z), with a voxel spacing in mm in array axis order; and the one threshold comparison
(:func:`binarize`) every operating point, FROC sweep and threshold tuning makes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(array: ArrayLike) -> np.ndarray:
    """A C-contiguous numpy view/copy of ``array`` (torch tensors are moved to the CPU)."""
    if isinstance(array, torch.Tensor):
        array = array.detach()
        if array.is_floating_point() and array.dtype not in (torch.float32, torch.float64):
            array = array.float()  # half precisions are widened (numpy has no bfloat16)
        array = array.cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def as_mask(array: ArrayLike, name: str) -> np.ndarray:
    """A 3D boolean mask; any non-zero value is foreground."""
    array = to_numpy(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D array (X, Y, Z), got shape {array.shape}")
    return array if array.dtype == np.bool_ else array != 0


def as_probability(array: ArrayLike, name: str = "prob") -> np.ndarray:
    """A 3D float array (float32 or float64; other types become float32)."""
    array = to_numpy(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D array (X, Y, Z), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array


def exclude_ignored(
    pred: ArrayLike, target: ArrayLike, ignored: ArrayLike
) -> tuple[ArrayLike, ArrayLike]:
    """nnU-Net's rule for its ``ignore`` label, applied before any metric: the voxels ``ignored``
    in the reference become background in both the prediction and the reference.

    Lesions are found afterwards, so a predicted component lying only in ignored voxels is
    neither a true nor a false positive, a lesion lying only there is no miss, and Dice and
    surface Dice compare the annotated voxels only (docs/evaluation.md). Numpy arrays or torch
    tensors (probabilities, masks or labels); ``ignored`` broadcasts against both.
    """
    keep = ~ignored
    return pred * keep, target * keep


def check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")


def as_spacing(spacing: Sequence[float] | ArrayLike) -> tuple[float, float, float]:
    """Three positive finite spacings in mm (array axis order), from any sequence or tensor."""
    values = tuple(float(s) for s in np.asarray(to_numpy(spacing), dtype=np.float64).ravel())
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {values}")
    return values  # type: ignore[return-value]


def binarize(prob: ArrayLike, threshold: float) -> np.ndarray:
    """``prob >= threshold``, compared in the array's own float type.

    Every probability/threshold comparison of the library (operating point, FROC sweep,
    threshold tuning) is made this way, so they agree voxel for voxel: a float32 map compared
    with a float64 threshold can differ from the float32 comparison at values on the threshold.
    """
    prob = as_probability(prob)
    return prob >= prob.dtype.type(threshold)
