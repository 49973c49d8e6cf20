"""How hard is a lesion dataset without learning anything? A fixed intensity rule's headroom.

The rule marks a voxel when its normalised b1000 is above ``b1000_min`` and its normalised T1
below ``t1_max`` (metastases are bright on b1000 and dark on T1), inside the body mask, and
optionally only inside the true bone (the tissue map's bone: an oracle of where bone is, which
is what anatomical pretraining tries to learn). Its connected components are scored with the
library's lesion-wise rules (:func:`~sap_lightning.metrics.functional.lesion_detection`), after
the library's preprocessing (:func:`~sap_lightning.cache.normalize.prepare_image`,
:func:`~sap_lightning.cache.normalize.compute_body_mask`), so the numbers compare with the
study's. Each false positive is put down to the tissue most of its voxels belong to.

Two rules are reported per dataset: one fixed in advance, and one tuned on the dataset's
threshold-tuning fold (the study's folds: ``splits.json`` when there is one, else the library's
lesion folds with 3 folds and the dataset's seed, fold 0 for tuning) over a grid of thresholds,
then applied unchanged to the other folds, where both are scored.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from sap_lightning.cache.normalize import compute_body_mask, prepare_image
from sap_lightning.cache.splits import count_dataset_lesions, load_splits, make_lesion_folds
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import read_json
from sap_lightning.core.lesions import component_boxes, connected_components
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_canonical
from sap_lightning.dataset.info import DatasetInfo, read_case
from sap_lightning.dataset.validate import require_valid_dataset
from sap_lightning.metrics.functional import lesion_detection, match_lesions
from sap_lightning.synthetic import TISSUES_DIR, TISSUES_JSON, tissue_path

log = logging.getLogger(__name__)

FIXED_RULE = (0.9, 0.25)
"""The rule fixed in advance: normalised b1000 > 0.9 and T1 < 0.25."""
B1000_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
T1_GRID: tuple[float, ...] = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
TUNING_FOLDS = 3
"""Folds made when a dataset has no ``splits.json`` (the demo study's number), fold 0 tuning."""
AIR_MARGIN = 3
"""Air voxels this many voxels away from the body measure the noise."""
RICIAN_STD = math.sqrt(2.0 - math.pi / 2.0)
"""Standard deviation of Rician magnitude noise with no signal, in units of its sigma."""


@dataclass(frozen=True)
class Rule:
    """Mark voxels with normalised b1000 > ``b1000_min`` and normalised T1 < ``t1_max``."""

    b1000_min: float
    t1_max: float

    def __str__(self) -> str:
        return f"b1000 > {self.b1000_min:g}, T1 < {self.t1_max:g}"


@dataclass
class Case:
    """One patient as the rule sees it: normalised (T1, b1000), lesion mask, tissue map, masks
    (voxels of the dataset's ``ignore`` label are in neither the lesion mask nor the body)."""

    case_id: str
    normed: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    body: np.ndarray
    bone: np.ndarray
    marrow: np.ndarray
    spacing: tuple[float, float, float]

    def predict(self, rule: Rule, bone_only: bool) -> np.ndarray:
        pred = (self.normed[1] > rule.b1000_min) & (self.normed[0] < rule.t1_max) & self.body
        return pred & self.bone if bone_only else pred


@dataclass
class CaseScore:
    f2: float
    sensitivity: float
    fp: int
    fp_by_tissue: dict[str, int] = field(default_factory=dict)
    fp_in_bone: int = 0


def _crop(*masks: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of every voxel of ``masks`` plus one voxel: components and matches
    computed on it are those of the whole volume."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return tuple(slice(0, 1) for _ in union.shape)
    lo = [int(np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i)))[0]) for i in range(3)]  # fmt: skip
    hi = [int(np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i)))[-1]) for i in range(3)]  # fmt: skip
    return tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(lo, hi))


def score(
    case: Case, rule: Rule, bone_only: bool, names: dict[int, str] | None = None
) -> CaseScore:
    """The rule's lesion-wise score on one case; with ``names`` (tissue value -> name), its
    false positives split by the tissue most of each one's voxels belong to."""
    pred = case.predict(rule, bone_only)
    box = _crop(pred, case.label)
    result = lesion_detection(pred[box], case.label[box], case.spacing)
    out = CaseScore(result.f2, result.sensitivity, result.n_false_positive)
    if names is not None and out.fp:
        match = match_lesions(pred[box], case.label[box])
        labels, tissue, bone = match.pred_labels, case.tissue[box], case.bone[box]
        unmatched = np.flatnonzero(~match.pred_matched) + 1
        in_fp = np.isin(labels, unmatched)
        ids, values = labels[in_fp], tissue[in_fp].astype(np.int64)
        table = np.zeros((int(labels.max()) + 1, 256), np.int64)
        np.add.at(table, (ids, values), 1)
        majority = table[unmatched].argmax(axis=1)
        counts = Counter(names.get(int(v), str(int(v))) for v in majority)
        out.fp_by_tissue = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        bone_votes = ndimage.sum_labels(bone, labels, unmatched)
        sizes = np.bincount(ids, minlength=int(labels.max()) + 1)[unmatched]
        out.fp_in_bone = int(np.sum(bone_votes * 2 > sizes))
    return out


def lesion_cnr(case: Case) -> list[float]:
    """Each lesion's contrast-to-noise on normalised b1000: (median lesion - median marrow
    within two voxels around it) / the noise sigma measured in the air (Rician floor)."""
    air = ~ndimage.binary_dilation(case.tissue > 0, iterations=AIR_MARGIN)
    sigma = float(np.std(case.normed[1][air])) / RICIAN_STD
    if sigma <= 0:
        return []
    marrow = case.marrow
    lesions, count = connected_components(case.label)
    out = []
    for index, box in enumerate(component_boxes(lesions, count), start=1):
        wide = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
        voxels = lesions[wide] == index
        shell = ndimage.binary_dilation(voxels, np.ones((3, 3, 3), bool), iterations=2)
        shell &= ~voxels & marrow[wide]
        if shell.sum() >= 3:
            b1000 = case.normed[1][wide]
            out.append((float(np.median(b1000[voxels])) - float(np.median(b1000[shell]))) / sigma)
    return out


def legend(dataset: str | Path) -> dict:
    """A phantom dataset's ``tissues.json``: tissue names and groups (bone, mimics, ...)."""
    path = Path(dataset) / TISSUES_DIR / TISSUES_JSON
    if not path.is_file():
        raise DatasetError(f"{dataset}: no {TISSUES_DIR}/{TISSUES_JSON}: not a phantom dataset")
    return read_json(path)


def load_case(info: DatasetInfo, case_id: str, tissues: dict) -> Case:
    """Read, normalise (the cache's function) and mask one case; the tissue map (named by
    ``tissues``, the dataset's :func:`legend`) says where bone and marrow are."""
    arrays = read_case(info.case(case_id))
    normed, affine, _ = prepare_image(arrays.image, arrays.affine)
    body = compute_body_mask(normed, affine)
    tissue, tissue_affine, _ = read_canonical(tissue_path(info.root, case_id))
    if tissue.shape != normed.shape[1:] or not np.allclose(tissue_affine, affine):
        raise DatasetError(f"case {case_id}: tissue map does not match the images' grid")
    tissue = np.asarray(tissue).astype(np.uint8)
    if arrays.label is None:
        raise DatasetError(f"case {case_id}: no label file")
    marrow = [int(v) for v, name in tissues["values"].items() if name == "marrow"]
    lesion = arrays.label > 0
    if info.ignore_value is not None:  # nnU-Net's rule: background in both rule and reference
        ignored = arrays.label == info.ignore_value
        lesion &= ~ignored
        body = body & ~ignored
    return Case(
        case_id,
        normed,
        lesion,
        tissue,
        body,
        np.isin(tissue, tissues["bone"]),
        np.isin(tissue, marrow),
        layout.spacing_of(affine),
    )


def tuning_split(info: DatasetInfo, seed: int) -> tuple[list[str], list[str]]:
    """(tuning cases, test cases): the dataset's ``splits.json`` if it has one, else the
    library's lesion folds (:data:`TUNING_FOLDS` folds, fold 0 for tuning) for ``seed``."""
    path = layout.default_splits_path(info.root)
    if path.is_file():
        splits = load_splits(path, info)
        tuning = splits.tuning_cases()
    else:
        counts = count_dataset_lesions(info)
        folds = make_lesion_folds(
            info.case_ids,
            [counts[c] for c in info.case_ids],
            [info.subjects[c] for c in info.case_ids],
            n_folds=min(TUNING_FOLDS, len(info.case_ids)),
            tuning_fold=0,
            seed=seed,
        )
        tuning = folds["folds"][0]
    return sorted(tuning), sorted(c for c in info.case_ids if c not in set(tuning))


def median_f2(scores: Sequence[CaseScore]) -> float:
    """Median F2 over the cases with a lesion (a lesion-free case's F2 only flags false
    positives: docs/evaluation.md); NaN when none has one."""
    with_lesion = [s.f2 for s in scores if not math.isnan(s.sensitivity)]
    return float(np.median(with_lesion)) if with_lesion else math.nan


def tune(cases: Sequence[Case], bone_only: bool) -> tuple[Rule, float]:
    """The grid rule with the best median F2 on ``cases`` (ties: fewer median false
    positives, then the stricter b1000 threshold, then the stricter T1 threshold)."""
    best: tuple[tuple[float, float, float, float], Rule] | None = None
    for b1000_min in B1000_GRID:
        for t1_max in T1_GRID:
            rule = Rule(b1000_min, t1_max)
            scores = [score(c, rule, bone_only) for c in cases]
            f2 = median_f2(scores)
            fp = float(np.median([s.fp for s in scores]))
            key = (-f2, fp, -b1000_min, t1_max)
            if best is None or key < best[0]:
                best = (key, rule)
    assert best is not None
    return best[1], -best[0][0]


@dataclass
class Row:
    """One rule on one dataset's test cases, with or without the bone mask."""

    rule_name: str
    rule: Rule
    bone_only: bool
    cases: dict[str, CaseScore]
    tuning_f2: float | None = None

    def summary(self) -> dict:
        scores = list(self.cases.values())
        n = len(scores)
        tissues: Counter[str] = Counter()
        for s in scores:
            tissues.update(s.fp_by_tissue)
        sens = [s.sensitivity for s in scores if not math.isnan(s.sensitivity)]
        return {
            "rule": self.rule_name,
            "b1000_min": self.rule.b1000_min,
            "t1_max": self.rule.t1_max,
            "bone_mask": self.bone_only,
            "tuning_median_f2": self.tuning_f2,
            "n_cases": n,
            "median_f2": median_f2(scores),
            "median_sensitivity": float(np.median(sens)) if sens else float("nan"),
            "median_fp": float(np.median([s.fp for s in scores])),
            "mean_fp": float(np.mean([s.fp for s in scores])),
            "mean_fp_in_bone": float(np.mean([s.fp_in_bone for s in scores])),
            "mean_fp_outside_bone": float(np.mean([s.fp - s.fp_in_bone for s in scores])),
            "fp_by_tissue": {k: v / n for k, v in sorted(tissues.items(), key=lambda kv: -kv[1])},
            "cases": {
                c: {
                    "f2": s.f2,
                    "sensitivity": s.sensitivity,
                    "fp": s.fp,
                    "fp_in_bone": s.fp_in_bone,
                    "fp_by_tissue": s.fp_by_tissue,
                }
                for c, s in self.cases.items()
            },
        }


def analyse(dataset: str | Path, seed: int | None = None) -> dict:
    """The headroom of one lesion dataset (with tissue maps): the fixed and the tuned rule,
    each with and without the bone mask, on the test cases; lesion CNR on every case."""
    root = Path(dataset)
    info = require_valid_dataset(root, task="lesion")
    spec = read_json(root / layout.DATASET_JSON)
    phantom = spec.get("phantom", {})
    seed = int(phantom.get("seed", 0)) if seed is None else seed
    tuning_ids, test_ids = tuning_split(info, seed)
    tissues = legend(root)
    names = {int(v): n for v, n in tissues["values"].items()}
    tuning = [load_case(info, c, tissues) for c in tuning_ids]
    rules: list[tuple[str, Rule, bool, float | None]] = []
    for bone_only in (False, True):
        rules.append(("fixed", Rule(*FIXED_RULE), bone_only, None))
        best, f2 = tune(tuning, bone_only)
        rules.append(("tuned", best, bone_only, f2))
    rows = [Row(name, rule, bone, {}, f2) for name, rule, bone, f2 in rules]
    cnr = [v for c in tuning for v in lesion_cnr(c)]
    del tuning
    for case_id in test_ids:
        case = load_case(info, case_id, tissues)
        cnr += lesion_cnr(case)
        for row in rows:
            row.cases[case_id] = score(case, row.rule, row.bone_only, names)
    log.info("headroom of %s: %d tuning, %d test cases", root, len(tuning_ids), len(test_ids))
    return {
        "dataset": str(root),
        "mimics": phantom.get("mimics"),
        "seed": seed,
        "tuning_cases": tuning_ids,
        "test_cases": test_ids,
        "lesion_cnr": {
            "n": len(cnr),
            "median": float(np.median(cnr)) if cnr else float("nan"),
            "q1": float(np.percentile(cnr, 25)) if cnr else float("nan"),
            "q3": float(np.percentile(cnr, 75)) if cnr else float("nan"),
            "min": float(np.min(cnr)) if cnr else float("nan"),
        },
        "rows": [row.summary() for row in rows],
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(results: Sequence[dict], top: int = 4) -> str:
    """The headroom table: one line per dataset, rule and mask."""
    lines = [
        "| mimics | bone mask | rule | median F2 | median sensitivity | FP / exam median (mean) "
        "| mean FP in / outside bone | most FP (per exam) | lesion CNR median (IQR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        cnr = result["lesion_cnr"]
        cnr_text = f"{_fmt(cnr['median'], 1)} ({_fmt(cnr['q1'], 1)}-{_fmt(cnr['q3'], 1)})"
        knob = result["mimics"]
        for row in result["rows"]:
            most = ", ".join(f"{k} {v:.1f}" for k, v in list(row["fp_by_tissue"].items())[:top])
            rule = f"{row['rule']}: b1000 > {row['b1000_min']:g}, T1 < {row['t1_max']:g}"
            lines.append(
                f"| {'-' if knob is None else f'{knob:g}'} | {'yes' if row['bone_mask'] else 'no'} "
                f"| {rule} | {_fmt(row['median_f2'])} | {_fmt(row['median_sensitivity'])} "
                f"| {_fmt(row['median_fp'], 1)} ({_fmt(row['mean_fp'], 1)}) "
                f"| {_fmt(row['mean_fp_in_bone'], 1)} / {_fmt(row['mean_fp_outside_bone'], 1)} "
                f"| {most or '-'} | {cnr_text} |"
            )
    return "\n".join(lines) + "\n"
