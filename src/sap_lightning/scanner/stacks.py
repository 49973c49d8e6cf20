"""Pixels of a sorted stack as a SimpleITK image placed in the scanner's world (LPS).

The image is built from the slices this import sorted itself, not by GDCM's series reader
(which would sort b-values into one volume). Its geometry comes straight from the DICOM plane:
origin = ImagePositionPatient of the first slice (the centre of its first voxel), direction
columns = row cosine, column cosine and their cross product, spacing = (PixelSpacing[1],
PixelSpacing[0], regular slice step), so oblique and coronal stacks are placed by their
direction matrix. Values are the modality values (RescaleSlope / RescaleIntercept applied per
file). Missing slices (gaps of at most ``series.MAX_FILLED_SLICES``) are filled by linear
interpolation between their neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from sap_lightning.core.errors import DatasetError
from sap_lightning.scanner.series import Stack


def _slice_pixels(stack: Stack, index: int, root: Path) -> np.ndarray:
    header = stack.slices[index]
    where = f"case {stack.case_id}: {stack.label()}: {header.where(root)}"
    try:
        ds = pydicom.dcmread(header.path)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
    except Exception as err:  # pydicom, its pixel handlers and numpy raise many types
        raise DatasetError(
            f"{where}: unreadable pixel data ({type(err).__name__}: {err})".replace("\n", " ")
        ) from err
    if pixels.shape != (header.rows, header.columns):
        raise DatasetError(
            f"{where}: pixel data of shape {pixels.shape}, the header says "
            f"{header.rows} x {header.columns}"
        )
    return pixels * slope + intercept


def read_stack(stack: Stack, root: Path) -> sitk.Image:
    """The stack as a float32 SimpleITK image in LPS world coordinates; gaps filled."""
    volume = np.zeros((stack.n_slices, stack.first.rows, stack.first.columns), np.float32)
    for i, k in enumerate(stack.index):
        volume[k] = _slice_pixels(stack, i, root)
    for before, after in zip(stack.index[:-1], stack.index[1:]):
        for k in range(before + 1, after):
            t = (k - before) / (after - before)
            volume[k] = (1 - t) * volume[before] + t * volume[after]
    image = sitk.GetImageFromArray(volume)  # numpy (slice, row, column) = ITK (z, y, x)
    image.SetOrigin(tuple(float(v) for v in stack.first.position))
    image.SetSpacing(stack.spacing)
    image.SetDirection(tuple(float(v) for v in stack.direction.flatten()))
    return image
