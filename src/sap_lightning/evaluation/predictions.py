"""Evaluate a folder of predictions against a dataset's labels (the ``sap evaluate`` command).

Prediction folder, in the layout of ``inference/outputs.py``: ``probabilities/<case>.nii.gz``
(lesion probability, float in [0, 1]) and/or ``<case>.nii.gz`` (binary mask). When every case
has a probability map, the operating point is ``probability >= threshold`` and the FROC curve
comes from the same maps; otherwise, when every case has a binary mask, the masks are evaluated
as they are and there is no FROC curve. A ``sap predict`` folder must be one model's
(``outputs.require_single_model``); a folder of masks from another tool is read as it is.
Cross-validated predictions may come from several folders (one per fold model). Labels
come from the dataset (``labelsTr/<case>.nii.gz``, any non-zero voxel is lesion, the voxels of
an ``ignore`` label left out of both sides: :data:`IGNORE_RULE`); spacing from the label's
affine.

Outputs (all written atomically): ``cases.csv`` (one row per case, with its false positives
inside and outside bone), ``lesions.csv`` (one row per ground-truth lesion), ``froc.csv`` (counts
per case and threshold), ``false_positives.csv`` (every false-positive component, where it lies
and its tissue), ``summary.json`` (medians, settings, FROC points) and ``froc.png``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from torchmetrics import MetricCollection

from sap_lightning.core.errors import DatasetError, SapError
from sap_lightning.core.io import atomic_path, write_json
from sap_lightning.core.protocol import (
    DEFAULT_CONNECTIVITY,
    FROC_MAX_FP_ALL,
    FROC_MAX_FP_LARGE,
    LARGE_LESION_ML,
    MAX_PLAUSIBLE_VOLUME_RATIO,
    SURFACE_TOLERANCE_MM,
    THRESHOLD_GRID,
)
from sap_lightning.core.run_layout import THRESHOLD_FILE
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_image
from sap_lightning.evaluation.false_positives import (
    BoneReference,
    counts_by_location,
    false_positive_table,
)
from sap_lightning.evaluation.plots import plot_froc
from sap_lightning.evaluation.threshold import ThresholdChoice, tune_threshold
from sap_lightning.inference.outputs import (
    case_files,
    case_paths,
    output_cases,
    require_single_model,
)
from sap_lightning.metrics.arrays import binarize, exclude_ignored
from sap_lightning.metrics.lesion import LesionDetection, make_lesion_metrics

log = logging.getLogger(__name__)

CASES_CSV = "cases.csv"
LESIONS_CSV = "lesions.csv"
FROC_CSV = "froc.csv"
FALSE_POSITIVES_CSV = "false_positives.csv"
SUMMARY_JSON = "summary.json"
FROC_PNG = "froc.png"
THRESHOLD_JSON = THRESHOLD_FILE

AFFINE_TOLERANCE_MM = 1e-3
"""Largest allowed difference between prediction and label affines (mm)."""

RULES = {
    "detection": "any voxel overlap; each side counted on its own (GT lesions detected, "
    "predicted components touching a GT lesion)",
    "lesions": "3D connected components",
    "large_lesions": "sensitivity over GT lesions >= min_volume_ml found by a component of any "
    "size; FP and precision over predicted components >= min_volume_ml",
    "f2": "5PR / (4P + R) per patient, median over the patients with a lesion; an undefined "
    "side counts as 1 (cases.csv gives a patient without lesions 1 without false positives, 0 "
    "with any: a false-positive flag, left out of the median)",
    "segmentation": "Dice and area-weighted NSD of each detected GT lesion against the union of "
    "predicted components touching it; medians over detected lesions",
    "patient_mean_dice": "mean lesion Dice per patient with missed lesions scored 0",
    "froc": "mean sensitivity (patients with a lesion) vs mean FP per exam; AUC of the "
    "piecewise-linear curve from the origin, extended flat at the last sensitivity",
}
IGNORE_RULE = (
    "voxels of the reference's 'ignore' label are background in both prediction and reference "
    "before lesions are found: a component lying only there is neither TP nor FP, a lesion "
    "lying only there no miss; Dice and NSD compare the annotated voxels"
)
"""Added to ``rules`` (as ``ignore``) when the dataset declares nnU-Net's ``ignore`` label."""


@dataclass(frozen=True)
class EvaluationSettings:
    """How predictions are turned into lesions and scored."""

    threshold: float | None = None
    thresholds: tuple[float, ...] = THRESHOLD_GRID
    connectivity: int = DEFAULT_CONNECTIVITY
    min_volume_ml: float = LARGE_LESION_ML
    tolerance_mm: float = SURFACE_TOLERANCE_MM


@dataclass
class Evaluation:
    """Everything ``sap evaluate`` writes."""

    summary: dict[str, Any]
    cases: pd.DataFrame
    lesions: pd.DataFrame
    froc: pd.DataFrame
    froc_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    false_positives: pd.DataFrame | None = None
    """Every false-positive component with where it lies (``evaluation/false_positives.py``);
    ``sap evaluate`` has the masks to find them, a run's validation does not."""


# ------------------------------------------------------------------------------ finding files


PredictionDirs = str | os.PathLike | Sequence[str | os.PathLike]
"""One prediction folder, or several (one per cross-validation fold model)."""


def _folders(predictions_dir: PredictionDirs) -> list[Path]:
    if isinstance(predictions_dir, str | os.PathLike):
        return [Path(predictions_dir)]
    folders = [Path(p) for p in predictions_dir]
    if not folders:
        raise SapError("no prediction folder given")
    return folders


def _describe(predictions_dir: PredictionDirs) -> str | list[str]:
    folders = _folders(predictions_dir)
    return str(folders[0]) if len(folders) == 1 else [str(f) for f in folders]


def prediction_folder(predictions_dir: PredictionDirs, case_id: str) -> Path:
    """The folder holding a case: the only one, or the one of several that has its files."""
    folders = _folders(predictions_dir)
    if len(folders) == 1:
        return folders[0]
    owners = [f for f in folders if case_files(f, case_id)]
    if len(owners) > 1:
        raise DatasetError(
            f"case {case_id}: predicted in several folders ({[str(f) for f in owners]}); "
            "each case must come from one model"
        )
    if not owners:
        raise DatasetError(f"case {case_id}: no prediction in any of {[str(f) for f in folders]}")
    return owners[0]


def prediction_paths(predictions_dir: PredictionDirs, case_id: str) -> tuple[Path, Path]:
    """(probability map, binary mask) paths of a case in a prediction folder."""
    paths = case_paths(prediction_folder(predictions_dir, case_id), case_id)
    return paths.probability, paths.mask


def resolve_cases(
    dataset_dir: str | os.PathLike,
    cases: Sequence[str] | None = None,
    splits_path: str | os.PathLike | None = None,
    fold: int | str | None = None,
    predictions_dir: PredictionDirs | None = None,
) -> list[str]:
    """The cases to evaluate: an explicit list, a fold of ``splits.json``, or (given
    ``predictions_dir`` and neither) every case predicted there.

    ``fold`` is a fold number (a test fold or the tuning fold) or ``"tuning"``.
    """
    if cases:
        if splits_path is not None:
            raise SapError("give either --cases or --splits/--fold, not both")
        duplicates = sorted({c for c in cases if list(cases).count(c) > 1})
        if duplicates:
            raise SapError(f"cases listed twice: {duplicates}")
        return list(cases)
    if splits_path is None and fold is None and predictions_dir is not None:
        found = sorted({c for f in _folders(predictions_dir) for c in output_cases(f)})
        if found:
            return found
    if splits_path is None or fold is None:
        raise SapError("choose the cases: --cases a,b,... or --splits FILE --fold K")
    from sap_lightning.cache.splits import load_splits

    splits = load_splits(splits_path)
    if splits.task != "lesion":
        raise SapError(f"{splits_path}: a {splits.task} split has no folds to evaluate")
    if fold == "tuning" or fold == splits.tuning_fold:
        return splits.tuning_cases()
    try:
        return splits.test_cases(int(fold))
    except ValueError as err:
        raise SapError(f"--fold must be a fold number or 'tuning', got {fold!r}") from err


def check_prediction_folder(
    predictions_dir: PredictionDirs, dataset_dir: str | os.PathLike, case_ids: Sequence[str]
) -> str:
    """Check that every case has a label and a prediction of one model before any is read.

    Returns ``"probability"`` when every case has a probability map, ``"mask"`` when every case
    has a binary mask; otherwise raises an error naming a case and the file it lacks. A folder
    mixing models (``outputs.require_single_model``) or in the old flat layout is refused.
    """
    folders = _folders(predictions_dir)
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"prediction folder {folder} does not exist")
    if not case_ids:
        raise SapError("no cases to evaluate")
    for case_id in case_ids:
        label = layout.label_path(dataset_dir, case_id)
        if not label.is_file():
            raise DatasetError(f"case {case_id}: label {label} not found")
    where = {c: prediction_folder(folders, c) for c in case_ids}
    for folder in folders:
        require_single_model(folder, [c for c in case_ids if where[c] == folder])
    paths = {c: case_paths(where[c], c) for c in case_ids}
    has_prob = {c: paths[c].probability.is_file() for c in case_ids}
    if all(has_prob.values()):
        return "probability"
    has_mask = {c: paths[c].mask.is_file() for c in case_ids}
    if all(has_mask.values()):
        return "mask"
    for case_id in case_ids:
        if not has_prob[case_id] and not has_mask[case_id]:
            prob, mask = paths[case_id].probability, paths[case_id].mask
            raise DatasetError(f"case {case_id}: no prediction: neither {prob} nor {mask} exists")
    missing = next(c for c in case_ids if not has_prob[c])
    raise DatasetError(
        f"case {missing}: no probability map {paths[missing].probability} "
        "while other cases have one; give every case a probability map or every case a mask"
    )


def _load(path: Path, case_id: str, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise DatasetError(f"case {case_id}: {what} {path} not found")
    try:
        return nib.load(path)
    except Exception as err:
        raise DatasetError(f"case {case_id}: {what} {path}: unreadable ({err})") from err


def _load_label(path: Path, case_id: str) -> nib.Nifti1Image:
    """A label of any dataset file ending (``.nrrd``/``.mha`` through ``images.read_image``, in
    its file voxel order with the RAS affine, as ``sap predict`` writes predictions)."""
    if path.name.endswith((".nii", ".nii.gz")):
        return _load(path, case_id, "label")
    if not path.is_file():
        raise DatasetError(f"case {case_id}: label {path} not found")
    try:
        image = read_image(path)
    except Exception as err:
        raise DatasetError(f"case {case_id}: label {path}: unreadable ({err})") from err
    return nib.Nifti1Image(np.asarray(image.data), image.affine)


def load_case(
    predictions_dir: PredictionDirs,
    dataset_dir: str | os.PathLike,
    case_id: str,
    mode: str,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(prediction, label mask, spacing) of a case, checked against each other; voxels of the
    dataset's ``ignore`` label are background in both (``metrics.arrays.exclude_ignored``)."""
    label_file = layout.label_path(dataset_dir, case_id)
    label_image = _load_label(label_file, case_id)
    prob_file, mask_file = prediction_paths(predictions_dir, case_id)
    pred_file = prob_file if mode == "probability" else mask_file
    pred_image = _load(pred_file, case_id, "prediction")
    if pred_image.shape != label_image.shape:
        raise DatasetError(
            f"case {case_id}: {pred_file}: shape {pred_image.shape} differs from the label "
            f"{label_file} {label_image.shape}"
        )
    difference = np.abs(np.asarray(pred_image.affine) - np.asarray(label_image.affine)).max()
    if difference > AFFINE_TOLERANCE_MM:
        raise DatasetError(
            f"case {case_id}: {pred_file}: affine differs from the label {label_file} by "
            f"{difference:.4g} mm (prediction {np.round(pred_image.affine, 4).tolist()}, label "
            f"{np.round(label_image.affine, 4).tolist()})"
        )
    reference = np.asanyarray(label_image.dataobj)
    label = reference != 0
    if mode == "probability":
        pred = pred_image.get_fdata(dtype=np.float32)
        low, high = float(pred.min()), float(pred.max())
        if not (math.isfinite(low) and math.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise DatasetError(
                f"case {case_id}: {pred_file}: probabilities must lie in [0, 1], found "
                f"[{low:.4g}, {high:.4g}]"
            )
    else:
        pred = np.asanyarray(pred_image.dataobj) != 0
    ignore = layout.dataset_ignore_value(dataset_dir)
    if ignore is not None:
        pred, label = exclude_ignored(pred, label, reference == ignore)
    return pred, label, layout.spacing_of(label_image.affine)


# ------------------------------------------------------------------------------ evaluating


def tune_on_predictions(
    predictions_dir: PredictionDirs,
    dataset_dir: str | os.PathLike,
    case_ids: Sequence[str],
    settings: EvaluationSettings = EvaluationSettings(),
    progress: Callable[[str], None] | None = None,
) -> ThresholdChoice:
    """Choose the threshold maximising the median patient F2 on these cases' probability maps.

    Two rules keep the choice on what the paper measures (docs/evaluation.md):

    - only patients with lesions decide (the paper's cohort has no lesion-free patient; a clean
      lesion-free patient scores F2 = 1 at any high threshold and would pull the choice up),
      and a set of cases without any lesion is refused;
    - thresholds whose predictions cover an implausible lesion volume (median predicted / true
      volume above ``MAX_PLAUSIBLE_VOLUME_RATIO``) are not eligible: under any-overlap counting
      a whole-body blob scores F2 = 1.
    """
    if check_prediction_folder(predictions_dir, dataset_dir, case_ids) != "probability":
        raise SapError(
            f"--tune needs probability maps (probabilities/<case>{layout.FILE_ENDING}) for "
            "every case"
        )
    detection = LesionDetection(
        threshold=settings.thresholds[0],
        froc_thresholds=settings.thresholds,
        connectivity=settings.connectivity,  # type: ignore[arg-type]
        min_volume_ml=settings.min_volume_ml,
    )
    volume_ratios: dict[str, np.ndarray] = {}
    for case_id in case_ids:
        if progress:
            progress(case_id)
        prob, label, spacing = load_case(predictions_dir, dataset_dir, case_id, "probability")
        detection.update(prob, label, spacing, case_id)
        true_voxels = int(np.count_nonzero(label))
        if true_voxels:
            predicted = [np.count_nonzero(binarize(prob, t)) for t in detection.thresholds]
            volume_ratios[case_id] = np.asarray(predicted, dtype=np.float64) / true_voxels
    table = detection.case_table()
    f2 = detection.rates()["f2"]
    deciding = table["n_gt"].to_numpy() > 0
    if not deciding.any():
        raise DatasetError(
            f"{dataset_dir}: none of the {len(case_ids)} threshold-tuning cases "
            f"({', '.join(map(str, case_ids[:5]))}{', ...' if len(case_ids) > 5 else ''}) has a "
            "lesion in its label: a threshold cannot be tuned on lesion-free patients (their F2 "
            "only flags false positives); tune on cases with lesions"
        )
    f2 = f2[deciding].copy()
    implausible: list[float] = []
    if volume_ratios:
        median_ratio = np.median(np.stack(list(volume_ratios.values())), axis=0)
        blocked = median_ratio > MAX_PLAUSIBLE_VOLUME_RATIO
        if not blocked.all():
            f2[:, blocked] = np.nan
            implausible = [float(t) for t in detection.thresholds[blocked]]
    used = table["case_id"][deciding].tolist()
    return tune_threshold(
        detection.thresholds,
        f2,
        cases=used,
        settings={
            "connectivity": settings.connectivity,
            "predictions": _describe(predictions_dir),
            "dataset": str(dataset_dir),
            "deciding_patients": "patients with lesions",
            "lesion_free_patients_left_out": table["case_id"][~deciding].tolist(),
            "thresholds_with_implausible_volume": implausible,
        },
    )


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate_predictions(
    predictions_dir: PredictionDirs,
    dataset_dir: str | os.PathLike,
    case_ids: Sequence[str],
    settings: EvaluationSettings = EvaluationSettings(),
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score every case and summarise as the paper does (medians over patients/lesions)."""
    mode = check_prediction_folder(predictions_dir, dataset_dir, case_ids)
    if mode == "probability" and settings.threshold is None:
        raise SapError(
            "probability maps need a threshold: --threshold T, --threshold-file FILE or --tune"
        )
    threshold = settings.threshold if mode == "probability" else 0.5
    metrics = make_lesion_metrics(
        threshold=threshold,  # type: ignore[arg-type]
        froc_thresholds=settings.thresholds,
        connectivity=settings.connectivity,  # type: ignore[arg-type]
        min_volume_ml=settings.min_volume_ml,
        tolerance_mm=settings.tolerance_mm,
    )
    reference = BoneReference(dataset_dir)
    located = []
    for case_id in case_ids:
        if progress:
            progress(case_id)
        pred, label, spacing = load_case(predictions_dir, dataset_dir, case_id, mode)
        metrics.update(pred, label, spacing=spacing, case_id=case_id)
        mask = binarize(pred, threshold) if mode == "probability" else pred
        located.append(false_positive_table(mask, label, case_id, reference, settings.connectivity))
    evaluation = summarize_metrics(
        metrics,
        settings,
        threshold=threshold if mode == "probability" else None,
        sources={"predictions": _describe(predictions_dir), "dataset": str(dataset_dir)},
        ignore_label=layout.dataset_ignore_value(dataset_dir) is not None,
    )
    evaluation.false_positives = pd.concat(located, ignore_index=True)
    counts = counts_by_location(evaluation.false_positives, list(case_ids))
    evaluation.cases = evaluation.cases.merge(counts, on="case_id", how="left")
    return evaluation


def summarize_metrics(
    metrics: MetricCollection,
    settings: EvaluationSettings,
    threshold: float | None,
    sources: dict[str, str],
    ignore_label: bool = False,
) -> Evaluation:
    """The :class:`Evaluation` of an updated ``make_lesion_metrics`` collection.

    ``threshold`` is the operating point of probability maps, or ``None`` for binary masks
    (one operating point, no FROC curve); ``ignore_label``: the references had ``ignore``
    voxels (the rule is then stated). Used by ``sap evaluate`` and by lesion fine-tuning,
    which writes the evaluation of its last validation into the run folder. Under DDP every
    rank must call it (the tables are gathered from all ranks).
    """
    detection, segmentation = metrics["detection"], metrics["segmentation"]
    values = {name: float(v) for name, v in metrics.compute().items()}
    cases = detection.case_table().merge(segmentation.case_table(), on="case_id", how="outer")
    case_ids = [str(c) for c in cases["case_id"]]
    froc_curves: dict[str, dict[str, list[float]]] = {}
    if threshold is not None:
        for key, large in (("all", False), ("large", True)):
            curve = detection.froc(large)
            froc_curves[key] = {
                "mean_fp": curve["mean_fp"].tolist(),
                "sensitivity": curve["sensitivity"].tolist(),
            }
    else:  # a binary mask has one operating point, no curve
        for name in [n for n in values if n.startswith("froc_auc")]:
            values[name] = math.nan
    summary = {
        "metrics": {name: _finite_or_none(v) for name, v in values.items()},
        "n_cases": len(case_ids),
        "cases": case_ids,
        "operating_point": {
            "source": "probability >= threshold" if threshold is not None else "binary masks",
            "threshold": threshold,
        },
        "settings": {
            "connectivity": settings.connectivity,
            "min_volume_ml": settings.min_volume_ml,
            "large_suffix": detection.suffix,
            "tolerance_mm": settings.tolerance_mm,
            "froc_thresholds": [float(t) for t in detection.thresholds],
            "froc_max_fp": {"all": FROC_MAX_FP_ALL, "large": FROC_MAX_FP_LARGE},
        },
        "rules": {**RULES, "ignore": IGNORE_RULE} if ignore_label else RULES,
        "froc": {
            "thresholds": [float(t) for t in detection.thresholds],
            **{
                key: {name: [_finite_or_none(x) for x in points] for name, points in curve.items()}
                for key, curve in froc_curves.items()
            },
        },
        "sources": sources,
    }
    froc = detection.froc_table()
    return Evaluation(
        summary=summary,
        cases=cases,
        lesions=segmentation.lesion_table(),
        froc=froc if threshold is not None else froc.iloc[0:0],
        froc_curves=froc_curves,
    )


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike) -> list[Path]:
    """Write the CSVs, the summary and the FROC figure into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # summary.json goes first and comes back last: a folder that has one is complete and
    # consistent, even after an interrupted rewrite of an older evaluation
    (out / SUMMARY_JSON).unlink(missing_ok=True)
    _write_csv(evaluation.cases, out / CASES_CSV)
    _write_csv(evaluation.lesions, out / LESIONS_CSV)
    _write_csv(evaluation.froc, out / FROC_CSV)
    written = [out / CASES_CSV, out / LESIONS_CSV, out / FROC_CSV]
    if evaluation.false_positives is not None:
        _write_csv(evaluation.false_positives, out / FALSE_POSITIVES_CSV)
        written.append(out / FALSE_POSITIVES_CSV)
    if evaluation.froc_curves:
        min_ml = evaluation.summary["settings"]["min_volume_ml"]
        curves = {
            key: {"prediction": (curve["mean_fp"], curve["sensitivity"])}
            for key, curve in evaluation.froc_curves.items()
        }
        plot_froc(
            [
                ("all lesions", curves["all"], FROC_MAX_FP_ALL),
                (f"lesions >= {min_ml:g} mL", curves["large"], FROC_MAX_FP_LARGE),
            ],
            out / FROC_PNG,
        )
        written.append(out / FROC_PNG)
    write_json(out / SUMMARY_JSON, evaluation.summary)
    written.append(out / SUMMARY_JSON)
    return written
