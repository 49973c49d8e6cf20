"""The layout of a ``sap predict`` output folder: one owner for its paths, writes and provenance.

::

    OUT/prediction.json                 provenance: checkpoint (path, sha256), threshold, window,
                                        overlap, skeleton checkpoint, input, library version
    OUT/<case>.nii.gz                   uint8 mask at the threshold
    OUT/probabilities/<case>.nii.gz     16-bit lesion probability (``save_probability_nifti``)
    OUT/skeleton/<case>.nii.gz          with a skeleton model: 10-class map
    OUT/<case>_lesions.csv              lesion table
    OUT/<case>_mip.png                  coronal and sagittal b1000 MIPs with the lesions outlined
    OUT/<case>_summary.json             burden summary and the checkpoint hash; written last

Only masks sit at the top level under ``<case><ending>``, so the folder is an nnU-Net
prediction folder as it is (``nnUNetv2_evaluate_simple`` lists top-level files with the
dataset's ending). A folder holds one model's predictions: ``sap predict`` refuses a folder of
another model unless told to clear it (:func:`prepare_output_folder`), and ``sap evaluate``
refuses a folder whose cases disagree (:func:`require_single_model`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import sap_lightning
from sap_lightning.core.errors import DatasetError, SapError
from sap_lightning.core.io import atomic_path, read_json, write_json
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.dataset import layout

PREDICTION_JSON = "prediction.json"
PROBABILITY_DIR = "probabilities"
SKELETON_DIR = "skeleton"
LESIONS_SUFFIX = "_lesions.csv"
SUMMARY_SUFFIX = "_summary.json"
PICTURE_SUFFIX = "_mip.png"
FORMAT_VERSION = 2
"""Layout version recorded in ``prediction.json``; another version is refused, naming it."""
IDENTITY_KEYS = (
    "checkpoint",
    "skeleton_checkpoint",
    "threshold",
    "window",
    "overlap",
    "precision",
)
"""What makes two predictions the same model's: same weights (by hash), threshold, window
and inference precision."""

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CasePaths:
    """Every file ``sap predict`` writes for one case."""

    mask: Path
    probability: Path
    skeleton: Path
    lesions: Path
    summary: Path
    picture: Path

    def removal_order(self) -> list[Path]:
        """The summary first: a case without it is never taken for complete."""
        return [
            self.summary,
            self.lesions,
            self.picture,
            self.mask,
            self.probability,
            self.skeleton,
        ]


def case_paths(
    out_dir: str | os.PathLike, case_id: str, file_ending: str = layout.FILE_ENDING
) -> CasePaths:
    """The output paths of a case."""
    out = Path(out_dir)
    return CasePaths(
        mask=out / f"{case_id}{file_ending}",
        probability=out / PROBABILITY_DIR / f"{case_id}{file_ending}",
        skeleton=out / SKELETON_DIR / f"{case_id}{file_ending}",
        lesions=out / f"{case_id}{LESIONS_SUFFIX}",
        summary=out / f"{case_id}{SUMMARY_SUFFIX}",
        picture=out / f"{case_id}{PICTURE_SUFFIX}",
    )


# ------------------------------------------------------------------------------ provenance


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file a run folder, Lightning checkpoint or exported backbone resolves to."""
    path = Path(path)
    return last_checkpoint_path(path) if path.is_dir() else path


def describe_checkpoint(path: str | os.PathLike, window: Sequence[int]) -> dict[str, Any]:
    """Path, resolved file, content hash and sliding window of a model."""
    file = checkpoint_file(path)
    return {
        "path": str(Path(path).resolve()),
        "file": str(file.resolve()),
        "sha256": file_sha256(file),
        "window": [int(w) for w in window],
    }


def make_provenance(
    checkpoint: str | os.PathLike,
    window: Sequence[int],
    threshold: float,
    overlap: float,
    input_path: str | os.PathLike,
    skeleton_checkpoint: str | os.PathLike | None = None,
    skeleton_window: Sequence[int] | None = None,
    connectivity: int = DEFAULT_CONNECTIVITY,
    body_only: bool = False,
    precision: str = "32-true",
    skeleton_precision: str | None = None,
    pictures: bool = True,
) -> dict[str, Any]:
    """The ``prediction.json`` record of one ``sap predict`` configuration (``body_only``: the
    lesion model labels everything outside the body background, ``validation.body_only``;
    ``precision``: each network's inference precision, ``validation.precision``; ``pictures``:
    each case's MIP is drawn)."""
    skeleton = None
    if skeleton_checkpoint is not None:
        skeleton = describe_checkpoint(skeleton_checkpoint, skeleton_window or window)
        skeleton["precision"] = skeleton_precision or precision
    return {
        "format": FORMAT_VERSION,
        "sap_lightning": sap_lightning.__version__,
        "checkpoint": describe_checkpoint(checkpoint, window),
        "skeleton_checkpoint": skeleton,
        "threshold": float(threshold),
        "window": [int(w) for w in window],
        "overlap": float(overlap),
        "body_only": bool(body_only),
        "precision": precision,
        "connectivity": int(connectivity),
        "pictures": bool(pictures),
        "input": str(Path(input_path).resolve()),
        "layout": {
            "mask": f"<case>{layout.FILE_ENDING}",
            "probability": f"{PROBABILITY_DIR}/<case>{layout.FILE_ENDING}",
            "skeleton": f"{SKELETON_DIR}/<case>{layout.FILE_ENDING}",
            "lesions": f"<case>{LESIONS_SUFFIX}",
            "picture": f"<case>{PICTURE_SUFFIX}",
            "summary": f"<case>{SUMMARY_SUFFIX}",
        },
    }


def _identity(provenance: dict[str, Any]) -> dict[str, Any]:
    def sha(entry: Any) -> Any:
        return entry.get("sha256") if isinstance(entry, dict) else entry

    identity = {key: provenance.get(key) for key in IDENTITY_KEYS}
    identity["checkpoint"] = sha(identity["checkpoint"])
    skeleton = identity["skeleton_checkpoint"]
    identity["skeleton_checkpoint"] = sha(skeleton)
    if isinstance(skeleton, dict):
        identity["skeleton_precision"] = skeleton.get("precision")
    return identity


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _identity(old), _identity(new)
    names = {"checkpoint": "checkpoint sha256", "skeleton_checkpoint": "skeleton sha256"}
    return [f"{names.get(k, k)} {a[k]!r} -> {b[k]!r}" for k in IDENTITY_KEYS if a[k] != b[k]]


def read_provenance(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``prediction.json`` of a folder, or ``None`` when it has none."""
    path = Path(out_dir) / PREDICTION_JSON
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable provenance file ({err})") from err
    checkpoint = raw.get("checkpoint") if isinstance(raw, dict) else None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("sha256"), str):
        raise DatasetError(f"{path}: not a sap predict provenance file (no checkpoint sha256)")
    if not isinstance(raw.get("threshold"), int | float):
        raise DatasetError(f"{path}: not a sap predict provenance file (no threshold)")
    if raw.get("format") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: prediction folder format {raw.get('format')!r}; this sap_lightning reads "
            f"format {FORMAT_VERSION} (predict again into a new folder)"
        )
    return raw


def read_case_summary(out_dir: str | os.PathLike, case_id: str) -> dict[str, Any] | None:
    """A case's summary, or ``None`` when it has none (not predicted, or interrupted)."""
    path = case_paths(out_dir, case_id).summary
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError) as err:
        raise DatasetError(f"case {case_id}: {path}: unreadable summary ({err})") from err
    if not isinstance(raw, dict):
        raise DatasetError(f"case {case_id}: {path}: summary must be a JSON object")
    return raw


# ------------------------------------------------------------------------------ listing


def _stems(folder: Path, ending: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending)}


def output_cases(out_dir: str | os.PathLike) -> list[str]:
    """Case ids with any ``sap predict`` output in a folder."""
    out = Path(out_dir)
    ending = layout.FILE_ENDING
    cases = _stems(out, SUMMARY_SUFFIX) | _stems(out, LESIONS_SUFFIX) | _stems(out, ending)
    cases |= _stems(out, PICTURE_SUFFIX)
    cases |= _stems(out / PROBABILITY_DIR, ending) | _stems(out / SKELETON_DIR, ending)
    return sorted(c for c in cases if not c.startswith("."))


def case_files(out_dir: str | os.PathLike, case_id: str) -> list[Path]:
    """The files of a case present in a folder, summary first."""
    return [p for p in case_paths(out_dir, case_id).removal_order() if p.is_file()]


# ------------------------------------------------------------------------------ writing


def remove_case_outputs(out_dir: str | os.PathLike, case_id: str) -> None:
    """Remove a case's outputs, summary first (an interruption leaves no complete-looking case)."""
    for path in case_files(out_dir, case_id):
        path.unlink(missing_ok=True)


def clear_outputs(out_dir: str | os.PathLike) -> list[str]:
    """Remove every ``sap predict`` output and ``prediction.json``; nothing else is touched.

    Every summary goes first, so an interruption never leaves a case that looks complete.
    """
    out = Path(out_dir)
    cases = output_cases(out)
    for case_id in cases:
        case_paths(out, case_id).summary.unlink(missing_ok=True)
    for case_id in cases:
        remove_case_outputs(out, case_id)
    (out / PREDICTION_JSON).unlink(missing_ok=True)
    for folder in (out / PROBABILITY_DIR, out / SKELETON_DIR):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return cases


def prepare_output_folder(
    out_dir: str | os.PathLike, provenance: dict[str, Any], overwrite: bool = False
) -> Path:
    """Make ``out_dir`` this model's prediction folder, before any case is written.

    The same model (:data:`IDENTITY_KEYS`) resumes in its own folder, replacing the cases it
    predicts again. A folder holding another model's outputs, or case files without a
    ``prediction.json``, is refused unless ``overwrite``, which clears those outputs (and only
    those) first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SapError(f"--out {out}: exists and is not a folder")
    existing = read_provenance(out)
    cases = output_cases(out) if out.is_dir() else []
    if existing is not None and not _differences(existing, provenance):
        if existing != provenance:
            write_json(out / PREDICTION_JSON, provenance)
        return out
    if existing is not None or cases:
        if existing is not None:
            why = f"predictions of another model ({'; '.join(_differences(existing, provenance))})"
        else:
            shown = ", ".join(cases[:3]) + (", ..." if len(cases) > 3 else "")
            why = f"prediction files of {len(cases)} cases ({shown}) without a {PREDICTION_JSON}"
        if not overwrite:
            raise SapError(
                f"--out {out}: holds {why}; pass --overwrite to replace them, or choose another "
                "folder"
            )
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PREDICTION_JSON, provenance)
    return out


def write_case(
    out_dir: str | os.PathLike,
    provenance: dict[str, Any],
    case_id: str,
    *,
    affine: np.ndarray,
    mask: np.ndarray,
    probability: np.ndarray,
    table: pd.DataFrame,
    summary: dict[str, Any],
    skeleton: np.ndarray | None = None,
    header: Any = None,
    picture: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Write a case's files, each atomically, its old files removed first and its summary last.
    With the input's NIfTI ``header``, the images keep its qform/sform codes and units;
    ``picture(path=...)`` draws the case's MIP into ``path``.

    Returns the summary as written: ``summary`` with the case id, threshold and checkpoint hash.
    """
    paths = case_paths(out_dir, case_id)
    remove_case_outputs(out_dir, case_id)
    if skeleton is not None:
        layout.save_nifti(paths.skeleton, skeleton, affine, header)
    layout.save_probability_nifti(paths.probability, probability, affine, header)
    layout.save_nifti(paths.mask, mask, affine, header)
    with atomic_path(paths.lesions) as tmp:
        table.to_csv(tmp, index=False)
    if picture is not None:
        picture(path=paths.picture)
    written = {
        "case_id": case_id,
        "threshold": float(provenance["threshold"]),
        "checkpoint_sha256": provenance["checkpoint"]["sha256"],
        "input": provenance.get("input"),
        **summary,
    }
    write_json(paths.summary, written)
    return written


# ------------------------------------------------------------------------------ checking


def require_single_model(
    out_dir: str | os.PathLike, case_ids: Iterable[str] | None = None
) -> dict[str, Any] | None:
    """Refuse a folder whose cases come from several models; returns its provenance.

    In a folder with ``prediction.json`` (or with any summary) every case file must have a
    summary, and every summary the checkpoint hash and threshold of ``prediction.json`` (or of
    the other summaries). A folder with neither (masks from another tool) passes as it is.
    ``case_ids`` also checks cases not listed in the folder (they may have version-1 files).
    """
    out = Path(out_dir)
    provenance = read_provenance(out)
    cases = sorted(set(output_cases(out)) | set(case_ids or ()))
    summaries = {c: s for c in cases if (s := read_case_summary(out, c)) is not None}
    if provenance is None and not summaries:
        return None

    def model_of(summary: dict[str, Any]) -> tuple[Any, Any]:
        return summary.get("checkpoint_sha256"), summary.get("threshold")

    if provenance is not None:
        expected = (provenance["checkpoint"]["sha256"], float(provenance["threshold"]))
        source = f"{PREDICTION_JSON}'s"
    else:
        models = sorted({model_of(s) for s in summaries.values()}, key=repr)
        if len(models) > 1:
            groups = "; ".join(
                f"checkpoint sha256 {m[0]!s:.12} threshold {m[1]}: "
                f"{sorted(c for c, s in summaries.items() if model_of(s) == m)}"
                for m in models
            )
            raise DatasetError(f"{out}: mixes the predictions of several models ({groups})")
        expected, source = models[0], "the other summaries'"
    others = sorted(c for c, s in summaries.items() if model_of(s) != expected)
    if others:
        raise DatasetError(
            f"{out}: cases {others} were predicted by another model than {source} (checkpoint "
            f"sha256 {expected[0]!s:.12}, threshold {expected[1]}); re-run sap predict "
            "--overwrite"
        )
    orphans = [c for c in cases if c not in summaries and case_files(out, c)]
    if orphans:
        raise DatasetError(
            f"{out}: cases {orphans} have prediction files but no summary of the model in "
            f"{PREDICTION_JSON if provenance is not None else 'the folder'} (left by an "
            "interrupted or older sap predict); re-run sap predict"
        )
    return provenance
