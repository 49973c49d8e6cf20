"""The dataset format: nnU-Net v2 raw layout, label sets and file names, shared by every command.

A dataset folder holds ``dataset.json``, ``imagesTr/<case>_<XXXX><ending>`` (one file per
channel) and ``labelsTr/<case><ending>``, where ``<ending>`` is dataset.json's ``file_ending``
(``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``, as in nnU-Net). ``dataset.json`` may carry an
optional ``subjects`` mapping ``{case_id: subject_id}`` so that scans of one person stay in one
fold. Extra keys are allowed, as in nnU-Net.

Arrays are always in the NIfTI file's voxel order (nibabel's ``get_fdata`` order) and spacings
are in mm in that same order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from sap_lightning.core.io import atomic_path

CHANNEL_NAMES: tuple[str, ...] = ("T1", "b1000")
"""Network input channels, in order (docs/method.md: T1-weighted and DWI b=1000)."""

SKELETON_LABELS: dict[str, int] = {
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
"""Stage-1 label set: background + the paper's 9 skeletal regions (ribs are not labelled)."""

LESION_LABELS: dict[str, int] = {"background": 0, "lesion": 1}
"""Stage-2 label set: binary metastasis mask."""

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
SKELETON_REFERENCE_DIR = "skeletonTr"
"""Optional folder in a lesion dataset with per-case skeleton maps (the synthetic cohort has
them); used to report lesion counts per skeletal region, never as a network input."""
FILE_ENDING = ".nii.gz"
"""The default file ending, and the one of every file the library writes (caches aside)."""
FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
"""Image file endings a dataset may declare in ``file_ending`` (the ones nnU-Net v2 reads)."""
SPLITS_JSON = "splits.json"
TASKS: tuple[str, ...] = ("lesion", "skeleton")
"""What a labelled dataset can be: ``--task`` choices when the label set does not say."""
IGNORE_LABEL = "ignore"
"""nnU-Net v2's label for voxels nobody annotated (or no station covers): named ``ignore``, with
the highest label value. They are left out of the loss, of patch centres and of every metric
(docs/data.md, docs/evaluation.md); they are never a class the network learns."""
PREDICTION_SUFFIXES: tuple[str, ...] = ("_prob", "_skeleton", "_lesions", "_summary")
"""Suffixes ``sap predict`` appends to a case id for its outputs (``<case>_prob.nii.gz``,
``<case>_skeleton.nii.gz``, ``<case>_lesions.csv``, ``<case>_summary.json``): a case id equal to
another plus one of them would overwrite that case's outputs."""


PREPROCESSED_ENV = "SAP_PREPROCESSED"
"""Environment variable naming one root for every dataset's cache and splits (as nnU-Net's
``nnUNet_preprocessed``): ``$SAP_PREPROCESSED/<dataset name>/cache`` and ``.../splits.json``."""
FALLBACK_ROOT = Path("~/.cache/sap_lightning")
"""Used instead of the folder next to a read-only dataset (``$XDG_CACHE_HOME/sap_lightning``
when that variable is set)."""

_log = logging.getLogger(__name__)
_announced: set[Path] = set()


def _is_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` or, when it is missing, in its nearest existing
    parent (``os.access`` sees read-only mounts even as root)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def _dataset_name(dataset: Path) -> str:
    return Path(os.path.abspath(dataset)).name


def _preprocessed_root(dataset: Path) -> Path | None:
    """``$SAP_PREPROCESSED/<dataset name>``, or ``None`` when the variable is unset or empty."""
    root = os.environ.get(PREPROCESSED_ENV, "").strip()
    return Path(root).expanduser() / _dataset_name(dataset) if root else None


def _fallback(dataset: Path, legacy: Path, leaf: str) -> Path:
    """``legacy`` when it exists or can be written; else under the user's cache folder."""
    if legacy.exists() or _is_writable(legacy.parent):
        return legacy
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) / "sap_lightning" if base else FALLBACK_ROOT
    target = root.expanduser() / _dataset_name(dataset) / leaf
    if legacy not in _announced:
        _announced.add(legacy)
        _log.info(
            "%s is not writable: using %s instead (set %s to choose the folder)",
            legacy.parent,
            target,
            PREPROCESSED_ENV,
        )
    return target


def default_cache_path(dataset: str | os.PathLike) -> Path:
    """Where a dataset's preprocessing cache lives unless ``data.cache`` / ``--out`` say otherwise.

    ``$SAP_PREPROCESSED/<dataset name>/cache`` when that variable is set; else
    ``<dataset>/../cache/<dataset name>`` (outside the dataset, which stays untouched), unless
    that folder does not exist and cannot be created (a read-only dataset location): then
    ``~/.cache/sap_lightning/<dataset name>/cache``, with a log line saying so.
    """
    dataset = Path(dataset)
    root = _preprocessed_root(dataset)
    if root is not None:
        return root / "cache"
    name = _dataset_name(dataset)
    legacy = dataset.parent if dataset.name == name else Path(os.path.abspath(dataset)).parent
    return _fallback(dataset, legacy / "cache" / name, "cache")


def default_splits_path(dataset: str | os.PathLike) -> Path:
    """Where ``splits.json`` lives unless ``data.splits`` / ``sap split --out`` say otherwise.

    ``$SAP_PREPROCESSED/<dataset name>/splits.json`` when that variable is set; else
    ``<dataset>/splits.json``, unless it does not exist and the dataset folder is read-only:
    then ``~/.cache/sap_lightning/<dataset name>/splits.json``, with a log line saying so.
    """
    dataset = Path(dataset)
    root = _preprocessed_root(dataset)
    if root is not None:
        return root / SPLITS_JSON
    return _fallback(dataset, dataset / SPLITS_JSON, SPLITS_JSON)


def task_of_labels(labels: dict[str, int]) -> str | None:
    """The task a label set implies, or ``None`` when it does not say.

    Exactly one foreground label is a lesion dataset, whatever it is called (``lesion``,
    ``metastasis``, ``tumor``); the library's skeleton label set (names and values) is a skeleton
    dataset. Anything else (several foreground classes, e.g. lytic and blastic, or none) needs
    the task named explicitly (``--task``): guessing would train the wrong network silently.
    """
    foreground = [name for name, value in labels.items() if value != 0]
    if len(foreground) == 1:
        return "lesion"
    if labels == SKELETON_LABELS:
        return "skeleton"
    return None


def split_ignore(labels: dict[str, int]) -> tuple[dict[str, int], int | None]:
    """The classes of a label set and the value of its ``ignore`` label (``None`` without one)."""
    classes = {name: value for name, value in labels.items() if name != IGNORE_LABEL}
    return classes, labels.get(IGNORE_LABEL)


def lesion_labels(labels: dict[str, int]) -> dict[str, int]:
    """The two classes a lesion network learns from a dataset's label set.

    One foreground label keeps its name; several are merged into one ``lesion`` class (every
    voxel with a value above 0 is lesion).
    """
    foreground = sorted((value, name) for name, value in labels.items() if value != 0)
    name = foreground[0][1] if len(foreground) == 1 else "lesion"
    return {"background": 0, name: 1}


def dataset_file_ending(root: str | os.PathLike) -> str:
    """The ``file_ending`` a dataset declares (``FILE_ENDING`` when it does not say, or when
    ``dataset.json`` is missing or unreadable: the check reports that, not this helper)."""
    try:
        with open(Path(root) / DATASET_JSON) as f:
            ending = json.load(f).get("file_ending", FILE_ENDING)
    except (OSError, ValueError, AttributeError):
        return FILE_ENDING
    return ending if ending in FILE_ENDINGS else FILE_ENDING


def dataset_ignore_value(root: str | os.PathLike) -> int | None:
    """The value of the ``ignore`` label a dataset declares (``None`` when it declares none, or
    when ``dataset.json`` is missing or unreadable: the check reports that, not this helper)."""
    try:
        with open(Path(root) / DATASET_JSON) as f:
            value = json.load(f).get("labels", {}).get(IGNORE_LABEL)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def image_path(
    root: str | os.PathLike, case_id: str, channel: int, file_ending: str | None = None
) -> Path:
    """``imagesTr/<case>_<XXXX><ending>``; the ending defaults to the dataset's own."""
    ending = file_ending or dataset_file_ending(root)
    return Path(root) / IMAGES_DIR / f"{case_id}_{channel:04d}{ending}"


def label_path(root: str | os.PathLike, case_id: str, file_ending: str | None = None) -> Path:
    """``labelsTr/<case><ending>``; the ending defaults to the dataset's own."""
    ending = file_ending or dataset_file_ending(root)
    return Path(root) / LABELS_DIR / f"{case_id}{ending}"


def skeleton_reference_path(
    root: str | os.PathLike, case_id: str, file_ending: str | None = None
) -> Path:
    """``skeletonTr/<case><ending>``; the ending defaults to the dataset's own."""
    ending = file_ending or dataset_file_ending(root)
    return Path(root) / SKELETON_REFERENCE_DIR / f"{case_id}{ending}"


def affine_from_spacing(spacing: tuple[float, float, float]) -> np.ndarray:
    """A diagonal affine with the given voxel spacing and the origin at voxel (0, 0, 0)."""
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = spacing
    return affine


PROBABILITY_SCALE = 65535
"""Probabilities are stored as uint16 with slope 1/65535: NIfTI has no float16 type, and 16 bits
keep 1.5e-5 resolution at half the size of float32."""


def _image(
    array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None
) -> nib.Nifti1Image:
    """A NIfTI image of ``array``; with the input's ``header``, its qform/sform codes, units and
    description carry over (nibabel writes ``affine`` into both forms), its scaling does not."""
    image = nib.Nifti1Image(
        array, np.asarray(affine, dtype=np.float64), None if header is None else header.copy()
    )
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(None, None)
    return image


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write ``array`` as NIfTI atomically; the data type of ``array`` is kept."""
    return _save_atomic(path, _image(np.asarray(array), affine, header))


def save_probability_nifti(
    path: str | os.PathLike,
    probability: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> Path:
    """Write a probability map in [0, 1] as 16-bit NIfTI (readers get floats via the slope)."""
    scaled = np.rint(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16)
    image = _image(scaled, affine, header)
    image.header.set_slope_inter(1.0 / PROBABILITY_SCALE, 0.0)
    return _save_atomic(path, image)


def _save_atomic(path: str | os.PathLike, image: nib.Nifti1Image) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # nibabel picks compression from the suffix, so the temporary name keeps it.
        tmp_with_suffix = tmp.with_name(tmp.name + "".join(path.suffixes))
        try:
            nib.save(image, tmp_with_suffix)
            os.replace(tmp_with_suffix, tmp)
        finally:
            if tmp_with_suffix.exists():
                tmp_with_suffix.unlink()
    return path


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along each array axis, from an affine (column norms)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))
