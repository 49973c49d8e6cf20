"""Pictures of evaluated cases: each case's b1000 MIPs with its true positives, false positives
and missed lesions outlined (``inference/pictures``), for ``sap evaluate`` (every case) and the
study report (three patients chosen by a stated rule, every arm side by side).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.image import imsave

from sap_lightning.core.io import atomic_path
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_image
from sap_lightning.evaluation.predictions import PredictionDirs, load_case
from sap_lightning.inference.pictures import CasePicture, b1000_channel_of, draw_case
from sap_lightning.metrics.arrays import binarize

log = logging.getLogger(__name__)

PICTURES_DIR = "pictures"
"""Folder of an evaluation holding ``<case>.png``."""
STUDY_PANEL_PX = 420
"""Panel height of each picture in the study report's grid (the grid holds arms x patients)."""
BACKGROUND = 255


def b1000_channel(dataset_dir: str | os.PathLike) -> int:
    """:func:`b1000_channel_of` the channels ``dataset.json`` names (the second channel for a
    folder without one)."""
    path = Path(dataset_dir) / layout.DATASET_JSON
    if not path.is_file():
        return 1
    names = json.loads(path.read_text())["channel_names"]
    return b1000_channel_of([names[key] for key in sorted(names, key=int)])


def draw_evaluated_case(
    predictions_dir: PredictionDirs,
    dataset_dir: str | os.PathLike,
    case_id: str,
    threshold: float | None,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    connectivity: int = DEFAULT_CONNECTIVITY,
    panel_height_px: int | None = None,
) -> CasePicture:
    """One case's MIPs with the prediction (at ``threshold`` when the folder holds probability
    maps, as it is when it holds masks) matched against the reference, as ``sap evaluate``
    counts them."""
    mode = "probability" if threshold is not None else "mask"
    prediction, label, _ = load_case(predictions_dir, dataset_dir, case_id, mode)
    if threshold is not None:
        prediction = binarize(prediction, threshold)
    image = read_image(layout.image_path(dataset_dir, case_id, b1000_channel(dataset_dir)))
    extra = {} if panel_height_px is None else {"panel_height_px": panel_height_px}
    return draw_case(
        np.asarray(image.data, dtype=np.float32),
        image.affine,
        prediction=prediction,
        reference=label,
        path=path,
        title=title or case_id,
        connectivity=connectivity,
        **extra,
    )


def write_case_pictures(
    predictions_dir: PredictionDirs,
    dataset_dir: str | os.PathLike,
    case_ids: Sequence[str],
    threshold: float | None,
    out_dir: str | os.PathLike,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> list[Path]:
    """``<out_dir>/pictures/<case>.png`` for every case whose b1000 image the dataset holds
    (each written atomically); a folder of labels alone has nothing to draw on."""
    channel = b1000_channel(dataset_dir)
    drawable = [c for c in case_ids if layout.image_path(dataset_dir, c, channel).is_file()]
    if len(drawable) < len(case_ids):
        log.info(
            "%d of %d cases have no b1000 image in %s: no picture for them",
            len(case_ids) - len(drawable),
            len(case_ids),
            dataset_dir,
        )
    folder = Path(out_dir) / PICTURES_DIR
    if drawable:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for case_id in drawable:
        path = folder / f"{case_id}.png"
        draw_evaluated_case(
            predictions_dir, dataset_dir, case_id, threshold, path=path, connectivity=connectivity
        )
        written.append(path)
    return written


def draw_validation_case(
    case_id: str,
    image: Any,
    probability: Any,
    label: Any,
    spacing: Sequence[float],
    *,
    threshold: float,
    b1000_channel: int,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> np.ndarray:
    """A validated case's MIPs (RGB) from the arrays validation holds: the cached case (RAS+,
    ``spacing`` in mm) and its lesion probability at the validation ``threshold``."""
    probability = np.asarray(probability, dtype=np.float32)
    picture = draw_case(
        np.asarray(image[b1000_channel], dtype=np.float32),
        layout.affine_from_spacing(tuple(float(s) for s in spacing)),
        prediction=binarize(probability, threshold),
        reference=np.asarray(label) > 0,
        title=case_id,
        connectivity=connectivity,
        panel_height_px=STUDY_PANEL_PX,
    )
    return picture.rgb


@dataclass(frozen=True)
class ShownPatient:
    case_id: str
    role: str
    """``best``, ``median`` or ``worst`` by the baseline's patient F2 (or several, joined)."""


def choose_patients(baseline_cases: pd.DataFrame) -> list[ShownPatient]:
    """The baseline's best, median and worst patient by F2 among patients with a lesion (ties
    broken by case id), so every arm is shown on the same three patients."""
    rows = baseline_cases[baseline_cases["n_gt"] > 0].sort_values(["f2", "case_id"])
    ids = rows["case_id"].astype(str).tolist()
    if not ids:
        return []
    picks = {"best": ids[-1], "median": ids[len(ids) // 2], "worst": ids[0]}
    roles: dict[str, list[str]] = {}
    for role, case_id in picks.items():  # one patient may fill several roles
        roles.setdefault(case_id, []).append(role)
    return [ShownPatient(case_id, " and ".join(names)) for case_id, names in roles.items()]


def write_patient_grid(
    arms: Mapping[str, tuple[PredictionDirs, float | None]],
    dataset_dir: str | os.PathLike,
    patients: Sequence[ShownPatient],
    path: str | os.PathLike,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> Path:
    """One PNG: a row per patient, a column per arm (``arm -> (prediction folders,
    threshold)``), each cell that arm's MIPs of that patient with its TP / FP / FN."""
    rows = []
    for patient in patients:
        cells = [
            draw_evaluated_case(
                folders,
                dataset_dir,
                patient.case_id,
                threshold,
                title=f"{arm}: {patient.case_id} ({patient.role} baseline F2)",
                connectivity=connectivity,
                panel_height_px=STUDY_PANEL_PX,
            ).rgb
            for arm, (folders, threshold) in arms.items()
        ]
        rows.append(_concatenate(cells, axis=1))
    grid = _concatenate(rows, axis=0)
    with atomic_path(path) as tmp:
        imsave(tmp, grid, format="png")
    return Path(path)


def _concatenate(images: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Images side by side (``axis=1``) or stacked (``axis=0``), padded with white."""
    other = 1 - axis
    size = max(image.shape[other] for image in images)
    padded = []
    for image in images:
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[other] = (0, size - image.shape[other])
        padded.append(np.pad(image, pad, constant_values=BACKGROUND))
    return np.concatenate(padded, axis=axis)
