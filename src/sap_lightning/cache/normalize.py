"""Intensity normalisation and resampling shared by the cache and by inference."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import ndimage

from sap_lightning.dataset import layout

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- array operations


def normalize_channels(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip each channel to its ``lower``-``upper`` percentile and rescale it to [0, 1].

    Percentiles are taken over the whole volume given (docs/method.md: never over a patch). A
    constant channel is refused (``ValueError``): it carries no contrast and rescaling it would
    divide by zero; the dataset checks reject such files earlier, naming case and file. A channel
    that is not constant but whose percentiles coincide (over 98% of one value) becomes all zeros,
    with a warning. Returns the float32 image and the ``(C, 2)`` percentiles used.

    Written in numpy rather than with MONAI's ``ScaleIntensityRangePercentiles`` (which computes
    the same thing; the tests compare the two) so that preprocessing workers do not import torch
    and ``torch.quantile``'s input-size limit never applies to whole-body volumes.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"expected a (C, ...) image, got shape {image.shape}")
    normed = np.empty(image.shape, dtype=np.float32)
    percentiles = np.empty((image.shape[0], 2), dtype=np.float64)
    for index, channel in enumerate(image):
        # One float64 copy, partitioned in place (overwrite_input) instead of copied again.
        scratch = np.array(channel, dtype=np.float64)
        low, high = np.percentile(scratch, [lower, upper], overwrite_input=True)
        del scratch
        percentiles[index] = low, high
        if high > low:
            # In place on the float32 output: no full-size float64 temporaries.
            out = normed[index]
            np.clip(channel, low, high, out=out, casting="unsafe")
            out -= np.float32(low)
            out /= np.float32(high - low)
            np.clip(out, 0.0, 1.0, out=out)  # float32 rounding must not leave [0, 1]
        elif float(np.min(channel)) == float(np.max(channel)):
            raise ValueError(
                f"channel {index} is constant (every voxel is {low:g}): nothing to normalise"
            )
        else:
            log.warning(
                "channel %d: the %g and %g percentiles are both %g: the channel becomes zeros",
                index,
                lower,
                upper,
                low,
            )
            normed[index] = 0.0
    return normed, percentiles


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the grid covering the same extent at (about) ``target_spacing``.

    Voxels are treated as boxes (scipy's ``grid_mode=True``): the new grid spans exactly the old
    field of view, so the spacing actually reached is ``old_extent / new_shape`` per axis.
    """
    spacing = np.asarray(layout.spacing_of(affine))
    old_shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(1, np.round(old_shape * spacing / np.asarray(target_spacing)))
    scale = old_shape / new_shape  # old voxels per new voxel
    # New voxel i has its centre at old continuous index (i + 0.5) * scale - 0.5.
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(scale)
    to_old[:3, 3] = 0.5 * scale - 0.5
    new_affine = np.asarray(affine, dtype=np.float64) @ to_old
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), new_affine


def resample_volume(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample one 3D array to ``new_shape`` (order 1: linear for images, 0: nearest for labels).

    scipy.ndimage.zoom rather than MONAI ``Spacing`` or TorchIO ``Resample``: it works on the
    numpy arrays already in hand without torch or SimpleITK copies, ``grid_mode=True`` gives the
    exact box-to-box geometry that ``resampled_grid`` writes into the affine, and ``order=0``
    keeps label values intact.
    """
    zoom = np.asarray(new_shape, dtype=np.float64) / np.asarray(volume.shape, dtype=np.float64)
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(new_shape):  # rounding inside zoom; never expected
        raise RuntimeError(f"resampling produced shape {out.shape}, expected {tuple(new_shape)}")
    return out


def prepare_image(
    image: np.ndarray,
    affine: np.ndarray,
    target_spacing: Sequence[float] | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample (optional, linear) then normalise a ``(C, X, Y, Z)`` image.

    The one function that turns raw intensities into network input, shared by the cache and by
    inference. Normalising after resampling makes the percentiles those of the grid the network
    sees. Returns ``(normed float32, affine, percentiles (C, 2))``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if target_spacing is not None and not _same_spacing(affine, target_spacing):
        new_shape, affine = resampled_grid(image.shape[1:], affine, target_spacing)
        image = np.stack([resample_volume(channel, new_shape, order=1) for channel in image])
    normed, percentiles = normalize_channels(image, lower, upper)
    return normed, affine, percentiles


def _same_spacing(affine: np.ndarray, target_spacing: Sequence[float]) -> bool:
    return bool(np.allclose(layout.spacing_of(affine), target_spacing, rtol=1e-6, atol=0))


BODY_SMOOTHING_VOXELS = 1.0
"""Gaussian sigma applied before thresholding: it shrinks the air's noise about sevenfold
((2 sqrt(pi) sigma)^1.5; measured 0.04 -> 0.007 in the demo cohort), so no noise speck reaches
the threshold."""

BODY_MIN_PART = 0.01
"""Connected parts of the mask at least this share of the largest one are kept (arms lying apart
from the trunk); smaller ones are dropped as noise."""


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (SimpleITK's filter, 128 bins) of an array.

    SimpleITK comes with TorchIO; scikit-image's ``threshold_otsu`` would add a dependency for
    one function. Imported here: ``sap preprocess`` of an unchanged dataset never thresholds.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(image)
    return float(otsu.GetThreshold())


def compute_body_mask(
    normed: np.ndarray, affine: np.ndarray, threshold: float | None = None, dilation: int = 2
) -> np.ndarray:
    """A boolean body mask from a normalised ``(C, X, Y, Z)`` image (real data has none).

    Smooth the mean channel, threshold it (``threshold``, or by default Otsu's threshold, which
    separates the air's noise floor from tissue whatever the scanner's noise level: after
    percentile normalisation a diffusion channel's air can sit at 0.14 of its range, so a fixed
    threshold let noisy air into the mask), fill holes slice by slice in the axial plane (the
    body is cut open at the ends of the field of view, so 3D filling would miss them), keep the
    6-connected parts of at least ``BODY_MIN_PART`` of the largest (drops noise and table,
    keeps arms lying apart), then dilate a little. An image with nothing above the threshold
    gives the whole volume, so negative sampling still has somewhere to go.
    """
    smoothed = ndimage.gaussian_filter(normed.mean(axis=0), BODY_SMOOTHING_VOXELS)
    if threshold is None:
        threshold = otsu_threshold(smoothed)
    foreground = smoothed > threshold
    if not foreground.any():
        log.warning("no voxel above the body threshold %s: using the whole volume", threshold)
        return np.ones(foreground.shape, dtype=bool)
    # The array axis that points most along the world z (head-feet) axis is the slice axis.
    axial = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))
    planar = np.expand_dims(ndimage.generate_binary_structure(2, 1), axis=axial)
    filled = ndimage.binary_fill_holes(foreground, structure=planar)
    parts = cc3d.connected_components(filled, connectivity=6)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0  # background
    body = (sizes >= BODY_MIN_PART * sizes.max())[parts]
    if dilation > 0:
        cross = ndimage.generate_binary_structure(3, 1)
        body = ndimage.binary_dilation(body, structure=cross, iterations=dilation)
    return body
