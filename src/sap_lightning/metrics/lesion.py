"""torchmetrics wrappers of the lesion-wise metrics, safe under DDP, one whole case per update.

``update(preds, target, spacing, case_id)`` takes one case: ``preds`` a lesion probability map
(float, binarised at ``threshold`` with ``>=``) or a binary mask (bool or integer), ``target``
the binary label, both (X, Y, Z) or with leading singleton dimensions, ``spacing`` in mm in array
axis order. ``compute()`` returns a flat dict of scalar tensors (medians over patients, as the
paper) that can be passed to ``LightningModule.log_dict``; ``case_table()`` and
``lesion_table()`` return the per-case and per-lesion rows as pandas DataFrames (for CSVs).

DDP: every state is a list of 1-D tensors of the metric's float dtype, reduced with ``cat``
(int64 or 2-D list states crash the all-gather when a rank had no case). Each case row starts
with a 48-bit hash of its case id stored exactly as two 24-bit halves, and ``compute()`` keeps
only the first row of each case, so the duplicate cases a distributed sampler pads with are
dropped. Case names travel only inside the process that saw them: rows from other ranks show
``#<hash>`` in the tables.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from sap_lightning.core.case_keys import case_hash, join_case_hash
from sap_lightning.core.lesions import check_connectivity
from sap_lightning.core.protocol import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_THRESHOLD,
    FROC_MAX_FP_ALL,
    FROC_MAX_FP_LARGE,
    LARGE_LESION_ML,
    MAX_PLAUSIBLE_VOLUME_RATIO,
    SURFACE_TOLERANCE_MM,
    THRESHOLD_GRID,
)
from sap_lightning.metrics import functional as F
from sap_lightning.metrics.agreement import icc_2_1
from sap_lightning.metrics.arrays import as_mask, as_probability, as_spacing, binarize
from sap_lightning.metrics.froc import froc_auc, froc_curve


def _squeeze_case(array: Any, name: str) -> Any:
    """Drop leading singleton dimensions (batch, channel) down to (X, Y, Z)."""
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must hold one case as (X, Y, Z) with optional leading singleton "
            f"dimensions, got shape {tuple(array.shape)}"
        )
    return array


def _single_case_id(case_id: str | Sequence[str]) -> str:
    """The case id, also from a collated batch of one (``["case"]``)."""
    if not isinstance(case_id, str):
        if len(case_id) != 1:
            raise ValueError(f"one case per update, got case ids {list(case_id)}")
        case_id = case_id[0]
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"case_id must be a non-empty string, got {case_id!r}")
    return case_id


def _is_probability(preds: Any) -> bool:
    if isinstance(preds, torch.Tensor):
        return preds.is_floating_point()
    return np.issubdtype(np.asarray(preds).dtype, np.floating)


def _spacing_tuple(spacing: Any) -> tuple[float, float, float]:
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().reshape(-1).tolist()
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _synced(method: _Method) -> _Method:
    """Run a reader of the states on the states of all ranks, as ``compute()`` does.

    Under DDP this is a collective call: every rank must make it. Inside ``compute()`` the
    states are already synced and the method runs directly.
    """

    @functools.wraps(method)
    def wrapper(self: Metric, *args: Any, **kwargs: Any) -> Any:
        if self._is_synced:
            return method(self, *args, **kwargs)
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True
        ):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _nan_median(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def _nan_mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.mean(values)) if values.size else math.nan


class _CaseRowsMetric(Metric):
    """Shared plumbing: per-case rows in 1-D float list states, de-duplicated by case id."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._case_names: dict[int, str] = {}

    def _row_tensor(self, case_id: str, values: Sequence[float]) -> torch.Tensor:
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{type(self).__name__} states need float32 or float64, not {self.dtype}"
            )
        high, low = case_hash(case_id)
        self._case_names[join_case_hash(high, low)] = case_id
        return torch.tensor([high, low, *values], dtype=self.dtype, device=self.device)

    @staticmethod
    def _rows(
        state: list[torch.Tensor] | torch.Tensor, width: int, key_columns: int = 2
    ) -> np.ndarray:
        """All rows of a state as a (n, width) float64 array, duplicates dropped.

        Rows are keyed by their first ``key_columns`` values (the case hash, plus the lesion id
        for lesion rows); a padded duplicate case repeats its rows exactly, so the first copy
        of each key is kept.
        """
        if isinstance(state, list) and len(state) == 0:
            return np.empty((0, width))
        rows = dim_zero_cat(state).detach().cpu().double().numpy().reshape(-1, width)
        _, first = np.unique(rows[:, :key_columns], axis=0, return_index=True)
        return rows[np.sort(first)]

    def _case_name(self, high: float, low: float) -> str:
        key = join_case_hash(high, low)
        return self._case_names.get(key, f"#{key:012x}")

    def _prepare(
        self, preds: Any, target: Any, spacing: Any
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], bool]:
        preds = _squeeze_case(preds, "preds")
        target = _squeeze_case(target, "target")
        is_probability = _is_probability(preds)
        prob = as_probability(preds) if is_probability else as_mask(preds, "preds")
        return (
            prob,
            as_mask(target, "target"),
            as_spacing(_spacing_tuple(spacing)),
            is_probability,
        )


class LesionDetection(_CaseRowsMetric):
    """Per-exam lesion detection (any-overlap rule) and the FROC curve, in one pass per case.

    Counts are taken at every threshold of ``froc_thresholds`` plus the operating
    ``threshold``; the operating point gives sensitivity, precision, F2 and FP per exam (medians
    over the patients with a lesion; sensitivity and F2 of the >= 1 mL subset over those with
    such a lesion, its false positives over every exam) for all lesions and for lesions >=
    ``min_volume_ml`` (medians, and the means the paper reports for that subset), and the
    median false positives of lesion-free patients apart (``fp_per_exam_lesion_free``). Binary predictions give the same counts at every
    threshold, so their FROC curve is a single point.
    """

    higher_is_better = True

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        froc_thresholds: Sequence[float] = THRESHOLD_GRID,
        connectivity: F.Connectivity = DEFAULT_CONNECTIVITY,
        min_volume_ml: float = LARGE_LESION_ML,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.thresholds = F.check_thresholds([*froc_thresholds, threshold])
        self.operating_index = int(np.flatnonzero(self.thresholds == self.threshold)[0])
        # The operating threshold is counted with the others in one pass, but only the FROC
        # grid draws the curve: its area must not depend on the operating point.
        self.froc_mask = np.isin(self.thresholds, F.check_thresholds(froc_thresholds))
        self.connectivity = check_connectivity(connectivity)
        self.min_volume_ml = float(min_volume_ml)
        self.suffix = f"_{self.min_volume_ml:g}ml".replace(".", "p")
        self.add_state("case_rows", default=[], dist_reduce_fx="cat")

    # row: hash_hi, hash_lo, n_gt, n_gt_large, then per threshold the six counts below
    _COUNTS = (
        "n_detected",
        "n_pred",
        "n_pred_matched",
        "n_detected_large",
        "n_pred_large",
        "n_pred_matched_large",
    )

    @property
    def _width(self) -> int:
        return 4 + len(self._COUNTS) * len(self.thresholds)

    def update(self, preds: Any, target: Any, spacing: Any, case_id: str | Sequence[str]) -> None:
        prob, mask, spacing_mm, is_probability = self._prepare(preds, target, spacing)
        case_id = _single_case_id(case_id)
        if not is_probability:
            prob = prob.astype(np.float32)
        counts = F.froc_counts(
            prob, mask, spacing_mm, self.thresholds, self.connectivity, self.min_volume_ml
        )
        per_threshold = np.stack([getattr(counts, name) for name in self._COUNTS], axis=1)
        values = [counts.n_gt, counts.n_gt_large, *per_threshold.ravel().tolist()]
        self.case_rows.append(self._row_tensor(case_id, values))

    def _counts(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Case hashes (n, 2) and count arrays: n_gt (n,), per-threshold counts (n, T)."""
        rows = self._rows(self.case_rows, self._width)
        per_threshold = rows[:, 4:].reshape(len(rows), len(self.thresholds), len(self._COUNTS))
        counts = {name: per_threshold[:, :, k] for k, name in enumerate(self._COUNTS)}
        counts["n_gt"] = np.repeat(rows[:, 2:3], len(self.thresholds), axis=1)
        counts["n_gt_large"] = np.repeat(rows[:, 3:4], len(self.thresholds), axis=1)
        return rows[:, :2], counts

    @_synced
    def rates(self, large: bool = False) -> dict[str, np.ndarray]:
        """Per-case (n, T) arrays: sensitivity, precision, f2, fp (FP per exam) per threshold."""
        _, c = self._counts()
        s = "_large" if large else ""
        sensitivity, precision, f2 = F.detection_rates(
            c[f"n_gt{s}"], c[f"n_detected{s}"], c[f"n_pred{s}"], c[f"n_pred_matched{s}"]
        )
        fp = c[f"n_pred{s}"] - c[f"n_pred_matched{s}"]
        return {"sensitivity": sensitivity, "precision": precision, "f2": f2, "fp": fp}

    @_synced
    def froc(self, large: bool = False) -> dict[str, np.ndarray]:
        """FROC points per threshold: mean sensitivity (patients with a lesion) and mean FP."""
        r = self.rates(large)
        grid = self.froc_mask
        mean_fp, mean_sensitivity = froc_curve(r["sensitivity"][:, grid], r["fp"][:, grid])
        return {
            "thresholds": self.thresholds[grid],
            "mean_fp": mean_fp,
            "sensitivity": mean_sensitivity,
        }

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, float] = {"n_cases": float(len(self._rows(self.case_rows, self._width)))}
        k = self.operating_index
        for large, suffix, max_fp in (
            (False, "", FROC_MAX_FP_ALL),
            (True, self.suffix, FROC_MAX_FP_LARGE),
        ):
            r = self.rates(large)
            fp = r["fp"][:, k].astype(np.float64)
            # Sensitivity and F2 over the patients with a lesion of the category (a lesion-free
            # patient's F2 only flags false positives). Precision and false positives over the
            # patients with any lesion, those of lesion-free patients reported apart; for the
            # >= 1 mL subset over every exam, as the paper counts them.
            has_lesion = ~np.isnan(r["sensitivity"][:, k])
            scored = np.ones_like(has_lesion) if large else has_lesion
            out[f"sensitivity{suffix}"] = _nan_median(r["sensitivity"][:, k])
            out[f"precision{suffix}"] = _nan_median(r["precision"][scored, k])
            out[f"f2{suffix}"] = _nan_median(r["f2"][has_lesion, k])
            out[f"fp_per_exam{suffix}"] = _nan_median(fp[scored])
            out[f"mean_sensitivity{suffix}"] = _nan_mean(r["sensitivity"][:, k])
            out[f"mean_fp_per_exam{suffix}"] = _nan_mean(fp[scored])
            if not large:
                out["fp_per_exam_lesion_free"] = _nan_median(fp[~has_lesion])
            curve = self.froc(large)
            out[f"froc_auc{suffix}"] = froc_auc(curve["mean_fp"], curve["sensitivity"], max_fp)
        return {name: torch.tensor(value, dtype=torch.float32) for name, value in out.items()}

    @_synced
    def case_table(self) -> pd.DataFrame:
        """One row per case at the operating threshold, for all lesions and the large subset."""
        hashes, c = self._counts()
        k = self.operating_index
        table: dict[str, Any] = {"case_id": [self._case_name(*h) for h in hashes]}
        for large, suffix in ((False, ""), (True, self.suffix)):
            s = "_large" if large else ""
            r = self.rates(large)
            table[f"n_gt{suffix}"] = c[f"n_gt{s}"][:, k].astype(int)
            table[f"n_pred{suffix}"] = c[f"n_pred{s}"][:, k].astype(int)
            table[f"n_detected{suffix}"] = c[f"n_detected{s}"][:, k].astype(int)
            table[f"n_pred_matched{suffix}"] = c[f"n_pred_matched{s}"][:, k].astype(int)
            table[f"n_fp{suffix}"] = r["fp"][:, k].astype(int)
            table[f"sensitivity{suffix}"] = r["sensitivity"][:, k]
            table[f"precision{suffix}"] = r["precision"][:, k]
            table[f"f2{suffix}"] = r["f2"][:, k]
        return pd.DataFrame(table)

    @_synced
    def froc_table(self) -> pd.DataFrame:
        """Long table: one row per (case, threshold) with every count (for FROC bootstraps)."""
        hashes, c = self._counts()
        names = [self._case_name(*h) for h in hashes]
        grid = self.froc_mask
        n_cases, n_thr = len(names), int(grid.sum())
        table: dict[str, Any] = {
            "case_id": np.repeat(np.asarray(names, dtype=object), n_thr),
            "threshold": np.tile(self.thresholds[grid], n_cases),
        }
        for name in ("n_gt", "n_gt_large", *self._COUNTS):
            table[name] = c[name][:, grid].reshape(-1).astype(int)
        return pd.DataFrame(table)


class LesionSegmentationQuality(_CaseRowsMetric):
    """Segmentation quality: Dice and NSD of detected lesions, per-patient mean Dice (missed
    lesions 0), global Dice, total lesion volume per exam and its ICC(2,1) against the GT.
    """

    higher_is_better = True

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        tolerance_mm: float = SURFACE_TOLERANCE_MM,
        connectivity: F.Connectivity = DEFAULT_CONNECTIVITY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.threshold = float(F.check_thresholds([threshold])[0])
        self.tolerance_mm = float(tolerance_mm)
        self.connectivity = check_connectivity(connectivity)
        self.add_state("case_rows", default=[], dist_reduce_fx="cat")
        self.add_state("lesion_rows", default=[], dist_reduce_fx="cat")

    # case row: hash_hi, hash_lo, gt_volume_ml, pred_volume_ml, intersection_ml, n_lesions
    _CASE_WIDTH = 6
    # lesion row: hash_hi, hash_lo, lesion_id, volume_ml, detected, dice, nsd, pred_volume_ml,
    # n_pred_components
    _LESION_WIDTH = 9

    def update(self, preds: Any, target: Any, spacing: Any, case_id: str | Sequence[str]) -> None:
        prob, mask, spacing_mm, is_probability = self._prepare(preds, target, spacing)
        case_id = _single_case_id(case_id)
        pred = binarize(prob, self.threshold) if is_probability else prob
        ml = F.voxel_volume_ml(spacing_mm)
        scores = F.lesion_scores(pred, mask, spacing_mm, self.tolerance_mm, self.connectivity)
        self.case_rows.append(
            self._row_tensor(
                case_id,
                [
                    np.count_nonzero(mask) * ml,
                    np.count_nonzero(pred) * ml,
                    np.count_nonzero(pred & mask) * ml,
                    len(scores),
                ],
            )
        )
        for s in scores:
            values = [s.lesion_id, s.volume_ml, s.detected, s.dice, s.nsd, s.pred_volume_ml]
            self.lesion_rows.append(self._row_tensor(case_id, [*values, s.n_pred_components]))

    def _case_rows(self) -> np.ndarray:
        return self._rows(self.case_rows, self._CASE_WIDTH)

    def _lesion_rows(self) -> np.ndarray:
        return self._rows(self.lesion_rows, self._LESION_WIDTH, key_columns=3)

    @_synced
    def case_table(self) -> pd.DataFrame:
        cases = self._case_rows()
        lesions = self._lesion_rows()
        gt_ml, pred_ml, shared_ml = cases[:, 2], cases[:, 3], cases[:, 4]
        with np.errstate(invalid="ignore", divide="ignore"):
            global_dice = np.where(gt_ml + pred_ml > 0, 2 * shared_ml / (gt_ml + pred_ml), 1.0)
        case_keys = [join_case_hash(*h) for h in cases[:, :2]]
        lesion_keys = np.array([join_case_hash(*h) for h in lesions[:, :2]], dtype=np.int64)
        mean_dice, dice_detected, nsd_detected = [], [], []
        for key in case_keys:
            own = lesions[lesion_keys == key]
            detected = own[own[:, 4] > 0]
            mean_dice.append(own[:, 5].mean() if len(own) else math.nan)
            dice_detected.append(detected[:, 5].mean() if len(detected) else math.nan)
            nsd_detected.append(detected[:, 6].mean() if len(detected) else math.nan)
        return pd.DataFrame(
            {
                "case_id": [self._case_name(*h) for h in cases[:, :2]],
                "n_lesions": cases[:, 5].astype(int),
                "gt_volume_ml": gt_ml,
                "pred_volume_ml": pred_ml,
                "global_dice": global_dice,
                "patient_mean_dice": np.asarray(mean_dice, dtype=np.float64),
                "mean_dice_detected": np.asarray(dice_detected, dtype=np.float64),
                "mean_nsd_detected": np.asarray(nsd_detected, dtype=np.float64),
            }
        )

    @_synced
    def lesion_table(self) -> pd.DataFrame:
        rows = self._lesion_rows()
        return pd.DataFrame(
            {
                "case_id": [self._case_name(*h) for h in rows[:, :2]],
                "lesion_id": rows[:, 2].astype(int),
                "volume_ml": rows[:, 3],
                "detected": rows[:, 4] > 0,
                "dice": rows[:, 5],
                "nsd": rows[:, 6],
                "pred_volume_ml": rows[:, 7],
                "n_pred_components": rows[:, 8].astype(int),
            }
        )

    def compute(self) -> dict[str, torch.Tensor]:
        cases = self.case_table()
        lesions = self.lesion_table()
        detected = lesions[lesions["detected"]]
        volumes = cases[["pred_volume_ml", "gt_volume_ml"]].to_numpy()
        out = {
            "dice_detected": _nan_median(detected["dice"].to_numpy()),
            "nsd_detected": _nan_median(detected["nsd"].to_numpy()),
            "patient_mean_dice": _nan_median(cases["patient_mean_dice"].to_numpy()),
            "global_dice": _nan_median(cases["global_dice"].to_numpy()),
            "volume_icc": icc_2_1(volumes) if len(volumes) >= 2 else math.nan,
            "gt_volume_ml": _nan_median(cases["gt_volume_ml"].to_numpy()),
            "pred_volume_ml": _nan_median(cases["pred_volume_ml"].to_numpy()),
            "volume_ratio": volume_ratio(cases),
        }
        return {name: torch.tensor(value, dtype=torch.float32) for name, value in out.items()}


def volume_ratio(cases: pd.DataFrame) -> float:
    """Median over patients with lesions of predicted / true lesion volume (1 = right amount)."""
    with_lesions = cases[cases["gt_volume_ml"] > 0]
    if with_lesions.empty:
        return math.nan
    ratios = with_lesions["pred_volume_ml"].to_numpy() / with_lesions["gt_volume_ml"].to_numpy()
    return float(np.median(ratios))


def guarded_f2(f2: float, ratio: float) -> float:
    """The detection score to rank runs by: F2, or 0 when the predicted lesion volume is
    implausible (median ratio above :data:`MAX_PLAUSIBLE_VOLUME_RATIO`)."""
    if math.isfinite(ratio) and ratio > MAX_PLAUSIBLE_VOLUME_RATIO:
        return 0.0
    return float(f2)


def make_lesion_metrics(
    threshold: float = DEFAULT_THRESHOLD,
    froc_thresholds: Sequence[float] = THRESHOLD_GRID,
    connectivity: F.Connectivity = DEFAULT_CONNECTIVITY,
    min_volume_ml: float = LARGE_LESION_ML,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    prefix: str | None = None,
) -> MetricCollection:
    """The lesion metrics the paper reports, as one collection updated once per whole case:
    ``collection.update(prob, target, spacing=..., case_id=...)`` then
    ``log_dict(collection.compute())``.
    """
    return MetricCollection(
        {
            "detection": LesionDetection(threshold, froc_thresholds, connectivity, min_volume_ml),
            "segmentation": LesionSegmentationQuality(threshold, tolerance_mm, connectivity),
        },
        prefix=prefix,
        compute_groups=False,
    )
