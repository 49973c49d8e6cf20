"""T1 and b1000 images from tissue maps: signal, metastases and mimics, noise and bias field."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from sap_lightning.synthetic.anatomy import SubjectAnatomy
from sap_lightning.synthetic.lesions import Lesion
from sap_lightning.synthetic.mimics import Mimic
from sap_lightning.synthetic.rasterize import AnatomyMaps, dilate
from sap_lightning.synthetic.sites import SITES, Site
from sap_lightning.synthetic.tissues import (
    CHANNEL_SCALE,
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


def _station_gains(rng: np.random.Generator, n: int, spacing_z: float, sd: float) -> np.ndarray:
    """Log-gain steps between the 4-6 stations a whole-body DWI is stitched from."""
    stations = int(rng.integers(4, 7))
    gains = rng.normal(0.0, sd, stations)
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


def _lesion_texture(rng: np.random.Generator, lesion_ids: np.ndarray) -> np.ndarray:
    """A unit-variance random field with a correlation length of about 1.5 voxels at the
    metastases' voxels (one value per lesion voxel), drawn on their bounding box only."""
    where = np.nonzero(lesion_ids)
    if not len(where[0]):
        return np.zeros(0, np.float32)
    lo = [int(w.min()) for w in where]
    hi = [int(w.max()) + 1 for w in where]
    field = smooth_noise(rng, [b - a for a, b in zip(lo, hi)], cell=1.5)
    return field[tuple(w - a for w, a in zip(where, lo))]


def _background(
    anatomy: SubjectAnatomy, base_tissue: np.ndarray, region: np.ndarray, channel: int
) -> np.ndarray:
    """The anatomy's signal before metastases and mimics (yellow marrow in long bones)."""
    table = np.array(
        [SIGNAL.get(t, (0.0, 0.0))[channel] * anatomy.intensity_jitter[t][channel] for t in Tissue],
        np.float32,
    )
    image = table[base_tissue]
    yellow = (base_tissue == Tissue.MARROW) & np.isin(region, YELLOW_MARROW_REGIONS)
    image[yellow] = YELLOW_MARROW_SIGNAL[channel]
    return image


def render_images(
    rng: np.random.Generator,
    anatomy: SubjectAnatomy,
    maps: AnatomyMaps,
    base_tissue: np.ndarray,
    lesion_ids: np.ndarray,
    lesions: Sequence[Lesion],
    mimic_ids: np.ndarray,
    mimics: Sequence[Mimic],
    spacing: Sequence[float],
    site: Site = SITES[0],
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """T1 and b1000 images (float32, scanner units) of one scan.

    Anatomy by tissue (``base_tissue``, the map before metastases and mimics, with the
    subject's jitter; yellow marrow in long bones), then each mimic's own signal, then each
    metastasis's signal with its heterogeneity and soft edge (docs/cohort.md 1.1), bowel/fat
    texture, a Gaussian point-spread, the site's smooth multiplicative bias field (plus station
    steps on b1000), Rician noise at the site's level, and integer scanner units. The random
    draws do not depend on the mimics, so a case's noise is the same at every mimic density.
    ``noise=False`` returns the blurred noise- and bias-free signal instead, for checks.
    """
    shape = maps.tissue.shape
    texture = smooth_noise(rng, shape)
    fine = _lesion_texture(rng, lesion_ids)
    shading = 1.0 + 0.05 * texture
    bowel = maps.tissue == Tissue.BOWEL
    fat_share = 1.0 / (1.0 + np.exp(-3.0 * (texture[bowel] - 0.6)))
    in_lesion = lesion_ids > 0
    in_mimic = mimic_ids > 0
    # Boundary voxels: lesion voxels with a face neighbour outside the lesion.
    edge = in_lesion & dilate(
        ~in_lesion & dilate(in_lesion), ndimage.generate_binary_structure(3, 1)
    )
    ids = lesion_ids[in_lesion] - 1
    edge_ids = lesion_ids[edge] - 1
    texture_amp = np.array([les.texture for les in lesions], np.float32)
    edge_keep = np.array([les.edge for les in lesions], np.float32)
    clean = []
    for c in range(2):
        image = _background(anatomy, base_tissue, maps.region, c)
        background = image[edge]
        if mimics:
            look = np.array([m.t1 if c == 0 else m.b1000 for m in mimics], np.float32)
            image[in_mimic] = look[mimic_ids[in_mimic] - 1]
        if lesions:
            look = np.array([les.t1 if c == 0 else les.b1000 for les in lesions], np.float32)
            image[in_lesion] = np.maximum(look[ids] * (1.0 + texture_amp[ids] * fine), 0.0)
            image[edge] = background + edge_keep[edge_ids] * (image[edge] - background)
        image[bowel] = (1 - fat_share) * image[bowel] + fat_share * SIGNAL[Tissue.FAT][c]
        image *= shading
        clean.append(ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0.35)))
    if not noise:
        return clean[0] * CHANNEL_SCALE[0], clean[1] * CHANNEL_SCALE[1]

    shared = [_smooth_curve(rng, n, 0.15 * site.bias) for n in shape]
    stations = _station_gains(rng, shape[2], float(spacing[2]), site.station_sd)
    out = []
    for c, image in enumerate(clean):
        own = [_smooth_curve(rng, n, 0.05 * site.bias) for n in shape]
        profiles = [np.exp(shared[i] + own[i]) for i in range(3)]
        if c == 1:
            profiles[2] = profiles[2] * np.exp(stations)
        gain = CHANNEL_SCALE[c] * site.gain[c] * rng.uniform(0.85, 1.15)
        sigma = site.noise[c] * rng.uniform(0.8, 1.25)
        image *= profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2]
        image += sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        magnitude = np.sqrt(image * image + imaginary * imaginary)
        out.append(np.rint(magnitude * gain).astype(np.float32))
    return out[0], out[1]
