"""Reading image files into one canonical frame: RAS+ voxel order.

Whole-body MRI arrives stored in any voxel order (axial LPS, coronal RSA, sagittal PIL, ...).
Networks see voxel arrays, not world coordinates, so every image and label is brought to the
closest canonical orientation of its affine before it is cached or predicted: array axis 0
runs towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior (RAS+,
nibabel's ``as_closest_canonical``). Only flips and axis permutations are applied
(``io_orientation`` / ``apply_orientation``), never resampling, so voxel values are untouched
and the inverse is exact: predictions are written back in the input's own voxel order, affine,
shape and header (:meth:`SourceFrame.from_canonical`).

In this frame "spacing" is ``(X, Y, Z)`` in mm, the axial plane is array axes 0 and 1 and the
head-feet axis is axis 2, whatever the scanner wrote.

NIfTI files are read with nibabel; its affine rule is kept (the sform when its code is > 0, else
the qform, else the pixel sizes), and a qform that disagrees with the sform in use is reported.
MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) files are read with SimpleITK, whose
direction and origin are in LPS: the first two rows are negated to give the RAS affine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

log = logging.getLogger(__name__)

NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
ITK_ENDINGS: tuple[str, ...] = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_FILE_ENDINGS: tuple[str, ...] = NIFTI_ENDINGS + ITK_ENDINGS
"""Every file ending :func:`read_image` reads."""

QFORM_SFORM_TOLERANCE_MM = 1e-3
"""Largest qform/sform difference (mm) not reported: the qform is stored as a float32
quaternion, so an exact sform and its qform differ by rounding well below this."""

RAS_ORNT = orientations.axcodes2ornt(("R", "A", "S"))
"""The canonical orientation (identity: axis i stays axis i, no flip)."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_reported: set[tuple[str, int]] = set()
"""Files whose qform/sform disagreement was already logged in this process (path, mtime)."""


def image_file_ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz`` before ``.nii``), or ``None``."""
    name = Path(path).name.lower()
    return next((ending for ending in IMAGE_FILE_ENDINGS if name.endswith(ending)), None)


@dataclass(frozen=True)
class ImageFile:
    """One file as stored: its voxels in the file's own order and its voxel-to-RAS+ affine."""

    path: Path
    data: np.ndarray
    """Voxel values (NIfTI scaling applied), file voxel order, any dimensionality."""
    affine: np.ndarray
    """Voxel index -> RAS+ scanner mm (4 x 4)."""
    affine_source: str
    """Which header field the affine comes from: ``sform``, ``qform``, ``pixdim`` (neither
    code set, nibabel's fallback) or ``itk`` (direction, spacing, origin)."""
    header: nib.Nifti1Header | None
    """A copy of the NIfTI header (``None`` for ITK formats), for writing results back."""

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. ``"RAS"``, ``"LPS"``, ``"PIL"``."""
        return orientation_of(self.affine)


def orientation_of(affine: np.ndarray) -> str:
    """Axis codes of the closest orientation of ``affine`` (nibabel ``aff2axcodes``)."""
    return "".join(str(code) for code in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def read_image(path: str | os.PathLike, dtype: type | None = None) -> ImageFile:
    """Read an image file (NIfTI, MetaImage or NRRD) as stored, without reorienting it.

    ``dtype`` (e.g. ``np.float32``) converts the voxels while reading; ``None`` keeps the stored
    type (label checks need the integers). Errors of the underlying readers propagate: callers
    name the case and file.
    """
    path = Path(path)
    ending = image_file_ending(path)
    if ending in ITK_ENDINGS:
        return _read_itk(path, dtype)
    if ending is None:
        raise ValueError(f"unsupported file ending (supported: {', '.join(IMAGE_FILE_ENDINGS)})")
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"not a NIfTI image ({type(image).__name__})")
    header = image.header
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if sform_code > 0:
        source = "sform"
    elif qform_code > 0:
        source = "qform"
    else:
        source = "pixdim"
    affine = np.asarray(image.affine, dtype=np.float64)  # nibabel's get_best_affine: same rule
    if sform_code > 0 and qform_code > 0:
        _report_qform_sform(path, np.asarray(qform), np.asarray(sform))
    if dtype is not None and np.dtype(dtype).kind == "f":
        data = image.get_fdata(dtype=dtype)
    else:
        data = np.asanyarray(image.dataobj)
        if dtype is not None:
            data = data.astype(dtype)
    return ImageFile(path, data, affine, source, header.copy())


def _report_qform_sform(path: Path, qform: np.ndarray, sform: np.ndarray) -> None:
    difference = float(np.max(np.abs(qform - sform)))
    if not np.isfinite(difference) or difference <= QFORM_SFORM_TOLERANCE_MM:
        return
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key in _reported:
        return
    _reported.add(key)
    log.warning(
        "%s: qform and sform disagree by up to %.4g mm (%s vs %s); using the sform (nibabel's "
        "rule: the sform whenever its code is > 0)",
        path,
        difference,
        orientation_of(qform),
        orientation_of(sform),
    )


def _read_itk(path: Path, dtype: type | None) -> ImageFile:
    import SimpleITK as sitk  # ships with TorchIO; imported here so NIfTI-only use never loads it

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)  # (..., Z, Y, X), components last for vector pixels
    n_dims = image.GetDimension()
    spatial = list(range(n_dims))[::-1]  # ITK index order is the reverse of numpy's
    extra = list(range(n_dims, array.ndim))
    data = np.transpose(array, spatial + extra)
    if dtype is not None:
        data = data.astype(dtype)
    k = min(n_dims, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n_dims, n_dims)
    lps = np.eye(4)
    lps[:k, :k] = direction[:k, :k] @ np.diag(np.asarray(image.GetSpacing()[:k], np.float64))
    lps[:k, 3] = np.asarray(image.GetOrigin()[:k], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :] = _LPS_TO_RAS @ lps[:3, :]
    return ImageFile(path, data, affine, "itk", None)


# --------------------------------------------------------------------------- canonical frame


def reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the LAST three axes of ``array``.

    Channel-first arrays ``(C, X, Y, Z)`` and plain volumes ``(X, Y, Z)`` are both handled; the
    result is C-contiguous (flips and transposes only, values untouched).
    """
    lead = array.ndim - 3
    if lead < 0:
        raise ValueError(f"expected at least 3 spatial axes, got shape {array.shape}")
    spatial_first = np.moveaxis(array, list(range(lead)), list(range(3, 3 + lead)))
    moved = orientations.apply_orientation(spatial_first, ornt)
    return np.ascontiguousarray(np.moveaxis(moved, list(range(3, 3 + lead)), list(range(lead))))


def canonical_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the canonical (RAS+) array of a ``shape``-d volume with ``affine``."""
    ornt = orientations.io_orientation(affine)
    return np.asarray(affine, dtype=np.float64) @ orientations.inv_ornt_aff(ornt, shape[-3:])


def canonical_shape(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The shape of the canonical (RAS+) array of a volume of ``shape`` with ``affine``."""
    ornt = orientations.io_orientation(affine)
    out = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = int(shape[axis])
    return (out[0], out[1], out[2])


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` brought to the closest canonical RAS+ orientation, no resampling.

    The spatial axes are the last three of ``array``; the returned affine maps the new voxel
    indices to the same world points, so both describe the same image.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = orientations.io_orientation(affine)
    return reorient(array, ornt), canonical_affine(affine, array.shape)


@dataclass(frozen=True)
class SourceFrame:
    """The frame an input was stored in, to write results back exactly as the input."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    header: nib.Nifti1Header | None
    affine_source: str

    @property
    def orientation(self) -> str:
        return orientation_of(self.affine)

    @property
    def canonical_affine(self) -> np.ndarray:
        return canonical_affine(self.affine, self.shape)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :func:`to_canonical` for an array on the canonical grid of this input:
        the same voxels in the input's own voxel order (last three axes)."""
        to_source = orientations.ornt_transform(RAS_ORNT, orientations.io_orientation(self.affine))
        back = reorient(array, to_source)
        if back.shape[-3:] != self.shape:
            raise ValueError(
                f"array of shape {array.shape} is not on the canonical grid of an input of "
                f"shape {self.shape} ({self.orientation})"
            )
        return back

    @classmethod
    def of(cls, image: ImageFile) -> SourceFrame:
        shape = tuple(int(s) for s in image.data.shape[:3])
        return cls(image.affine, shape, image.header, image.affine_source)  # type: ignore[arg-type]


def read_canonical(
    path: str | os.PathLike, dtype: type | None = None
) -> tuple[np.ndarray, np.ndarray, SourceFrame]:
    """Read a 3D image and bring it to RAS+: ``(array, canonical affine, source frame)``."""
    image = read_image(path, dtype)
    if image.data.ndim != 3:
        raise ValueError(f"not a 3D volume: shape {tuple(image.data.shape)}")
    array, affine = to_canonical(image.data, image.affine)
    return array, affine, SourceFrame.of(image)
