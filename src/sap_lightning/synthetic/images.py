"""T1 and b1000 images from tissue maps: signal, noise and bias field."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from sap_lightning.synthetic.anatomy import SubjectAnatomy
from sap_lightning.synthetic.rasterize import AnatomyMaps
from sap_lightning.synthetic.tissues import (
    CHANNEL_SCALE,
    LESION_B1000_RANGE,
    LESION_T1_RANGE,
    SIGNAL,
    YELLOW_MARROW_REGIONS,
    YELLOW_MARROW_SIGNAL,
    Tissue,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _smooth_curve(rng: np.random.Generator, n: int, amplitude: float, terms: int = 3) -> np.ndarray:
    """A random low-frequency 1-D profile (a few cosines), for the separable bias field."""
    t = np.linspace(0.0, 1.0, n)
    curve = sum(
        rng.normal(0, amplitude / k) * np.cos(math.pi * k * t + rng.uniform(0, 2 * math.pi))
        for k in range(1, terms + 1)
    )
    return np.asarray(curve, np.float32)


def _station_gains(rng: np.random.Generator, n: int, spacing_z: float) -> np.ndarray:
    """Log-gain steps between the 4-6 stations a whole-body DWI is stitched from."""
    stations = int(rng.integers(4, 7))
    gains = rng.normal(0.0, 0.08, stations)
    profile = gains[np.minimum((np.arange(n) * stations) // n, stations - 1)]
    return ndimage.gaussian_filter1d(profile, 12.0 / spacing_z).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float = 4.0) -> np.ndarray:
    """Smooth unit-variance random field with a correlation length of about ``cell`` voxels.

    Random values on a coarse lattice are interpolated with separable Gaussian weights (three
    small matrix products), much cheaper than filtering a full-resolution noise volume.
    """
    coarse = [math.ceil(n / cell) + 3 for n in shape]
    field = rng.standard_normal(coarse, dtype=np.float32)
    for axis, n in enumerate(shape):
        centres = (np.arange(coarse[axis]) - 1.5) * cell
        weights = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / cell) ** 2)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    return field / max(float(field.std()), 1e-6)


def render_images(
    rng: np.random.Generator,
    anatomy: SubjectAnatomy,
    maps: AnatomyMaps,
    lesion_ids: np.ndarray,
    spacing: Sequence[float],
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and b1000 images (float32, scanner units) of one scan.

    Signal by tissue (with the subject's jitter), yellow marrow in long bones, per-lesion
    contrast, bowel/fat texture, a Gaussian point-spread, a smooth multiplicative bias field
    (plus station steps on b1000), Rician noise, and integer scanner units. ``noise=False``
    returns the blurred noise- and bias-free signal instead, for checks.
    """
    shape = maps.tissue.shape
    n_lesions = int(lesion_ids.max())
    lesion_signal = np.stack(
        [rng.uniform(*LESION_T1_RANGE, n_lesions), rng.uniform(*LESION_B1000_RANGE, n_lesions)]
    )
    texture = smooth_noise(rng, shape)
    shading = 1.0 + 0.05 * texture
    yellow = maps.marrow & np.isin(maps.region, YELLOW_MARROW_REGIONS)
    in_lesion = lesion_ids > 0
    bowel = maps.tissue == Tissue.BOWEL
    fat_share = 1.0 / (1.0 + np.exp(-3.0 * (texture[bowel] - 0.6)))
    clean = []
    for c in range(2):
        table = np.array(
            [SIGNAL[t][c] * anatomy.intensity_jitter[t][c] for t in Tissue], np.float32
        )
        image = table[maps.tissue]
        image[yellow] = YELLOW_MARROW_SIGNAL[c]
        image[in_lesion] = lesion_signal[c][lesion_ids[in_lesion] - 1]
        image[bowel] = (1 - fat_share) * image[bowel] + fat_share * SIGNAL[Tissue.FAT][c]
        image *= shading
        clean.append(ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0.35)))
    if not noise:
        return clean[0] * CHANNEL_SCALE[0], clean[1] * CHANNEL_SCALE[1]

    shared = [_smooth_curve(rng, n, 0.15) for n in shape]
    stations = _station_gains(rng, shape[2], float(spacing[2]))
    out = []
    for c, image in enumerate(clean):
        own = [_smooth_curve(rng, n, 0.05) for n in shape]
        profiles = [np.exp(shared[i] + own[i]) for i in range(3)]
        if c == 1:
            profiles[2] = profiles[2] * np.exp(stations)
        gain = CHANNEL_SCALE[c] * rng.uniform(0.85, 1.15)
        sigma = (0.015 if c == 0 else 0.018) * rng.uniform(0.8, 1.25)
        image *= profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2]
        image += sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        magnitude = np.sqrt(image * image + imaginary * imaginary)
        out.append(np.rint(magnitude * gain).astype(np.float32))
    return out[0], out[1]
