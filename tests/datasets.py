"""Tiny NIfTI datasets written from scratch for tests (independent of the phantom generator).

Import as ``from tests.datasets import write_tiny_dataset`` (``tests`` is a package, so pytest
puts the repository root on ``sys.path`` when it loads ``tests/conftest.py``).

Volumes are a few thousand voxels: an ellipsoidal "body" with noise in air, two channels (T1,
b1000) and, per case, either lesions (small cuboids placed in disjoint cells, so the number of
6-connected components is exactly the number requested) or skeleton classes (small boxes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

CHANNELS = ("T1", "b1000")
LESION_LABELS = {"background": 0, "lesion": 1}
SKELETON_LABELS = {
    "background": 0,
    "cervical_spine": 1,
    "thoracic_spine": 2,
    "lumbar_spine": 3,
    "pelvis": 4,
    "femurs": 5,
    "humeri": 6,
    "scapulae": 7,
    "clavicles": 8,
    "sternum": 9,
}
CELL = 4
"""Lesions/regions are placed in disjoint CELL^3 cells with at most CELL-1 voxels per side, so two
of them never touch."""


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file with nibabel directly (the tests' own writer, not the library's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_data_dtype(np.asarray(array).dtype)
    nib.save(image, path)
    return path


def affine_for(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = origin
    return affine


def body_of(shape: Sequence[int]) -> np.ndarray:
    """An ellipsoid filling about 60% of the field of view."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return sum((g / 0.85) ** 2 for g in grid) <= 1.0


def _cells_inside(body: np.ndarray) -> list[tuple[int, int, int]]:
    """Origins of the CELL^3 cells that lie completely inside the body."""
    cells = []
    for x in range(0, body.shape[0] - CELL + 1, CELL):
        for y in range(0, body.shape[1] - CELL + 1, CELL):
            for z in range(0, body.shape[2] - CELL + 1, CELL):
                if body[x : x + CELL, y : y + CELL, z : z + CELL].all():
                    cells.append((x, y, z))
    return cells


def make_case(
    shape: Sequence[int],
    task: str,
    n_objects: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image (2, X, Y, Z) float32, label (X, Y, Z) uint8)`` for one synthetic case."""
    body = body_of(shape)
    cells = _cells_inside(body)
    if n_objects > len(cells):
        raise ValueError(f"shape {tuple(shape)} fits only {len(cells)} objects, {n_objects} asked")
    label = np.zeros(shape, np.uint8)
    chosen = rng.choice(len(cells), size=n_objects, replace=False)
    for index, cell in enumerate(cells[i] for i in chosen):
        size = rng.integers(1, CELL, size=3)  # 1..CELL-1 voxels per side
        box = tuple(slice(c, c + s) for c, s in zip(cell, size))
        label[box] = 1 if task == "lesion" else 1 + index % (len(SKELETON_LABELS) - 1)
    t1 = np.where(body, 100.0, 2.0) + rng.normal(0, 3, shape)
    b1000 = np.where(body, 20.0, 1.0) + rng.normal(0, 1, shape)
    lesion = label > 0
    t1[lesion], b1000[lesion] = 50.0, 80.0
    return np.stack([t1, b1000]).astype(np.float32), label


def write_tiny_dataset(
    root: str | Path,
    n_cases: int = 4,
    task: str = "lesion",
    shape: Sequence[int] = (20, 16, 12),
    spacing: Sequence[float] = (1.5, 1.5, 4.0),
    seed: int = 0,
    lesions_per_case: int | Sequence[int] = 2,
    subjects: Mapping[str, str] | None = None,
    skeleton_reference: bool = False,
    labelled: bool = True,
    channels: Sequence[str] = CHANNELS,
) -> Path:
    """Write a valid nnU-Net v2 raw dataset with cases ``case000``, ``case001``, ...

    ``lesions_per_case`` (an int or one count per case) is the number of lesions (lesion task) or
    labelled boxes (skeleton task) in each case. ``channels`` beyond T1 and b1000 (e.g. ADC) get
    an ADC-like image (1.0 in the body, 0.6 in lesions, noise). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = (
        [lesions_per_case] * n_cases
        if isinstance(lesions_per_case, int)
        else list(lesions_per_case)
    )
    if len(counts) != n_cases:
        raise ValueError(f"{len(counts)} lesion counts for {n_cases} cases")
    affine = affine_for(spacing, origin=(-10.0, 5.0, 2.5))
    for index, count in enumerate(counts):
        case_id = f"case{index:03d}"
        image, label = make_case(shape, task, count, rng)
        extra = [
            np.where(label > 0, 0.6, np.where(body_of(shape), 1.0, 0.05))
            + rng.normal(0, 0.05, shape)
            for _ in channels[len(CHANNELS) :]
        ]
        image = np.concatenate([image, np.asarray(extra, np.float32).reshape(-1, *shape)])
        for channel in range(image.shape[0]):
            save(root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz", image[channel], affine)
        if labelled:
            save(root / "labelsTr" / f"{case_id}.nii.gz", label, affine)
        if skeleton_reference:
            reference = (body_of(shape) & (rng.random(shape) < 0.1)).astype(np.uint8) * 3
            save(root / "skeletonTr" / f"{case_id}.nii.gz", reference, affine)
    spec = {
        "name": root.name,
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": LESION_LABELS if task == "lesion" else SKELETON_LABELS,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    if subjects:
        spec["subjects"] = dict(subjects)
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root


def write_authors_folder(
    src: str | Path,
    n_cases: int = 3,
    task: str = "lesion",
    shape: Sequence[int] = (20, 16, 12),
    spacing: Sequence[float] = (1.5, 1.5, 4.0),
    seed: int = 0,
) -> Path:
    """Write the authors' per-case layout: ``<case>/T1.nii.gz``, ``b1000``, ``lesions``/``skeleton``."""
    src = Path(src)
    rng = np.random.default_rng(seed)
    label_file = "lesions" if task == "lesion" else "skeleton"
    for index in range(n_cases):
        image, label = make_case(shape, task, 2, rng)
        case_dir = src / f"pat{index:02d}"
        for channel, name in enumerate(CHANNELS):
            save(case_dir / f"{name}.nii.gz", image[channel], affine_for(spacing))
        save(case_dir / f"{label_file}.nii.gz", label, affine_for(spacing))
    return src


def truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut a file short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
