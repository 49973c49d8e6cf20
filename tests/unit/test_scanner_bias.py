"""The N4 body mask (scanner/bias.py) finds a dim body among a few very bright structures."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from sap_lightning.scanner.bias import body_mask


def test_the_body_mask_covers_dim_tissue_next_to_bright_organs() -> None:
    """A diffusion-like station: air at a Rician noise floor, a dim body (muscle), two small
    organs thirty times brighter. Otsu on raw intensities would take the organs alone; the mask
    must hold the body and no air."""
    rng = np.random.default_rng(0)
    shape = (24, 64, 64)  # (z, y, x) as SimpleITK arrays
    image = np.abs(rng.normal(0, 3.0, shape) + 1j * rng.normal(0, 3.0, shape))
    _, yy, xx = np.indices(shape)
    body = ((yy - 32) / 22.0) ** 2 + ((xx - 32) / 26.0) ** 2 <= 1
    image[body] += 20.0
    organs = (((yy - 25) ** 2 + (xx - 25) ** 2) <= 9) | (((yy - 40) ** 2 + (xx - 40) ** 2) <= 9)
    image[organs & body] += 600.0
    mask = sitk.GetArrayFromImage(body_mask(sitk.GetImageFromArray(image.astype(np.float32))))
    assert mask[body].mean() > 0.95
    assert mask[~body].mean() < 0.05
