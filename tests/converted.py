"""Copies of a tiny ``.nii.gz`` dataset in the other file endings nnU-Net accepts.

Written with the reference libraries themselves (nibabel for ``.nii``, SimpleITK for ``.nrrd`` and
``.mha``), never with the library's own reader or writer, so a test compares the library against
an independent conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import SimpleITK as sitk

GZ = ".nii.gz"


def convert_file(source: Path, target: Path) -> Path:
    """Write ``source`` (a ``.nii.gz`` file) as ``target``; the ending picks the format."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.endswith(".nii"):
        image = nib.load(source)
        nib.save(nib.Nifti1Image(image.dataobj[...], image.affine, image.header), target)
    else:
        sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    return target


def convert_dataset(source: Path, target: Path, ending: str) -> Path:
    """Copy a ``.nii.gz`` dataset to ``target`` with every image file in ``ending``."""
    for path in sorted(source.rglob(f"*{GZ}")):
        rel = path.relative_to(source)
        convert_file(path, target / rel.parent / (path.name[: -len(GZ)] + ending))
    spec = json.loads((source / "dataset.json").read_text())
    spec["file_ending"] = ending
    (target / "dataset.json").write_text(json.dumps(spec, indent=2))
    for extra in ("splits.json",):
        if (source / extra).is_file():
            shutil.copy(source / extra, target / extra)
    return target
