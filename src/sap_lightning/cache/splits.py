"""Cross-validation splits (``splits.json``): lesion-count-stratified folds or a holdout split.

Lesion datasets (docs/evaluation.md, "clean variant"): ``n_folds`` folds stratified by lesion count and
grouped by subject; one fixed fold is the threshold-tuning fold and is never trained on. For
test fold ``k`` the model trains on every fold except ``k`` and the tuning fold, uses the tuning
fold for validation, and the threshold chosen on the tuning fold is applied to fold ``k``::

    {"task": "lesion", "n_folds": 7, "tuning_fold": 0, "seed": 0, "folds": [[case, ...], ...]}

Skeleton (healthy) datasets: one train/validation split grouped by subject (paper: 63/8 scans)::

    {"task": "skeleton", "seed": 0, "train": [...], "val": [...]}
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.cache.reader import PreprocessedCache
from sap_lightning.config.schema import DataConfig
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import file_lock, read_json, write_json
from sap_lightning.core.lesions import count_lesions
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.core.tasks import LABELLED_TASKS
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_image
from sap_lightning.dataset.info import DatasetInfo
from sap_lightning.dataset.validate import require_valid_dataset

# --------------------------------------------------------------------------- making splits


def count_file_lesions(
    label_path: str | os.PathLike,
    connectivity: int = DEFAULT_CONNECTIVITY,
    ignore_value: int | None = None,
) -> int:
    """Number of lesions (connected components of ``label > 0``: every foreground label is
    lesion, as in a lesion cache) in a label file of any supported ending; voxels of the
    ``ignore`` label (``ignore_value``) are background here, as in the cache."""
    try:
        label = np.asarray(read_image(label_path).data)
    except Exception as err:  # the readers raise many types on corrupt files
        raise DatasetError(f"{label_path}: unreadable label ({type(err).__name__}: {err})") from err
    if ignore_value is not None:
        label = np.where(label == ignore_value, 0, label)
    return count_lesions(label, connectivity)


def count_dataset_lesions(
    info: DatasetInfo, connectivity: int = DEFAULT_CONNECTIVITY
) -> dict[str, int]:
    """``{case_id: lesion count}`` for every labelled case of a dataset."""
    counts = {}
    for case in info.cases:
        if case.label is None:
            raise DatasetError(f"case {case.case_id}: no label file: cannot count its lesions")
        counts[case.case_id] = count_file_lesions(case.label, connectivity, info.ignore_value)
    return counts


def cache_lesion_counts(cache: PreprocessedCache) -> dict[str, int]:
    """``{case_id: lesion count}`` as the cache counted them (same connected components)."""
    return {case_id: len(cache.meta(case_id).get("lesions") or []) for case_id in cache.case_ids}


def _group_by_subject(case_ids: Sequence[str], subject_ids: Sequence[str]) -> dict[str, list[str]]:
    if len(case_ids) != len(subject_ids):
        raise DatasetError(f"{len(case_ids)} case ids but {len(subject_ids)} subject ids")
    duplicates = sorted(c for c, n in Counter(case_ids).items() if n > 1)
    if duplicates:
        raise DatasetError(f"case ids listed twice: {duplicates}")
    groups: dict[str, list[str]] = {}
    for case_id, subject_id in sorted(zip(case_ids, subject_ids)):
        groups.setdefault(subject_id, []).append(case_id)
    return groups


def make_lesion_folds(
    case_ids: Sequence[str],
    lesion_counts: Sequence[int],
    subject_ids: Sequence[str],
    n_folds: int = 7,
    tuning_fold: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Folds stratified by lesion count and grouped by subject, deterministic for a seed.

    Subjects (with the summed lesion count of their scans) are shuffled with the seed, sorted by
    count (most lesions first; the shuffle breaks ties) and dealt in bins of ``n_folds``: each
    fold gets one subject of every bin, so the lesion-count distribution is the same in every
    fold, and fold totals differ by at most the count range. Within a bin, subjects with more
    scans go to folds that hold fewer cases so far, keeping fold sizes even.
    """
    if len(lesion_counts) != len(case_ids):
        raise DatasetError(f"{len(case_ids)} case ids but {len(lesion_counts)} lesion counts")
    if any(int(n) != n or n < 0 for n in lesion_counts):
        raise DatasetError(
            f"lesion counts must be non-negative integers, got {list(lesion_counts)}"
        )
    if n_folds < 2:
        raise DatasetError(
            f"n_folds must be at least 2 (a tuning fold and a test fold), got {n_folds}"
        )
    if not 0 <= tuning_fold < n_folds:
        raise DatasetError(f"tuning fold {tuning_fold} is out of range 0..{n_folds - 1}")
    groups = _group_by_subject(case_ids, subject_ids)
    if len(groups) < n_folds:
        raise DatasetError(
            f"{len(case_ids)} cases of {len(groups)} subjects cannot fill {n_folds} folds: every "
            "fold needs at least one subject; use fewer folds"
        )
    count_of = dict(zip(case_ids, (int(n) for n in lesion_counts)))
    rng = np.random.default_rng(seed)
    ordered = sorted(groups)
    subjects = [ordered[i] for i in rng.permutation(len(ordered))]
    subject_total = {s: sum(count_of[c] for c in groups[s]) for s in subjects}
    subjects.sort(key=lambda s: -subject_total[s])  # stable: ties keep the seeded order

    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for start in range(0, len(subjects), n_folds):
        members = sorted(subjects[start : start + n_folds], key=lambda s: -len(groups[s]))
        rank = rng.permutation(n_folds)  # random tie-break between equally full folds
        free = set(range(n_folds))
        for subject in members:
            fold = min(free, key=lambda f: (len(folds[f]), rank[f]))
            free.remove(fold)
            folds[fold] += groups[subject]
    return {
        "task": "lesion",
        "n_folds": n_folds,
        "tuning_fold": tuning_fold,
        "seed": seed,
        "folds": [sorted(fold) for fold in folds],
        "lesion_counts": {case_id: count_of[case_id] for case_id in sorted(count_of)},
    }


def make_holdout_split(
    case_ids: Sequence[str],
    subject_ids: Sequence[str],
    val_fraction: float = 0.125,
    seed: int = 0,
) -> dict[str, Any]:
    """A train/validation split grouped by subject, with about ``val_fraction`` of the scans.

    Subjects are taken in a seeded random order into validation while they fit the target scan
    count; at least one subject stays on each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups = _group_by_subject(case_ids, subject_ids)
    if len(groups) < 2:
        raise DatasetError(
            f"{len(case_ids)} cases of {len(groups)} subject cannot be split into train and "
            "validation by subject"
        )
    target = max(1, round(val_fraction * len(case_ids)))
    rng = np.random.default_rng(seed)
    ordered = sorted(groups)
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    val_subjects: list[str] = []
    n_val = 0
    for subject in order:
        if n_val + len(groups[subject]) <= target and len(val_subjects) < len(groups) - 1:
            val_subjects.append(subject)
            n_val += len(groups[subject])
    if not val_subjects:  # every subject has more scans than the target: take the smallest
        val_subjects.append(min(order, key=lambda s: len(groups[s])))
    val = sorted(c for s in val_subjects for c in groups[s])
    train = sorted(c for s in groups if s not in val_subjects for c in groups[s])
    return {
        "task": "skeleton",
        "seed": seed,
        "val_fraction": val_fraction,
        "train": train,
        "val": val,
    }


# --------------------------------------------------------------------------- reading splits


@dataclass(frozen=True)
class Splits:
    """A validated ``splits.json``: lesion folds with a tuning fold, or a skeleton holdout."""

    task: str
    seed: int
    folds: tuple[tuple[str, ...], ...] = ()
    tuning_fold: int | None = None
    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    source: str = layout.SPLITS_JSON

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def case_ids(self) -> list[str]:
        if self.task == "lesion":
            return sorted(c for fold in self.folds for c in fold)
        return sorted((*self.train, *self.val))

    def _require_folds(self) -> None:
        if self.task != "lesion":
            raise DatasetError(f"{self.source}: a {self.task} split has no cross-validation folds")

    @property
    def test_folds(self) -> list[int]:
        """Every fold except the tuning fold."""
        self._require_folds()
        return [k for k in range(self.n_folds) if k != self.tuning_fold]

    def tuning_cases(self) -> list[str]:
        """The threshold-tuning fold; also the validation set while fine-tuning."""
        self._require_folds()
        return list(self.folds[self.tuning_fold])  # type: ignore[index]

    def _check_test_fold(self, fold: int) -> None:
        self._require_folds()
        if fold not in self.test_folds:
            what = "the tuning fold" if fold == self.tuning_fold else "out of range"
            raise DatasetError(
                f"{self.source}: fold {fold} is {what}; test folds are {self.test_folds}"
            )

    def test_cases(self, fold: int) -> list[str]:
        self._check_test_fold(fold)
        return list(self.folds[fold])

    def train_cases(self, test_fold: int) -> list[str]:
        """Training cases for a test fold: all folds except it and the tuning fold."""
        self._check_test_fold(test_fold)
        excluded = {test_fold, self.tuning_fold}
        return sorted(c for k, fold in enumerate(self.folds) if k not in excluded for c in fold)

    def val_cases(self, test_fold: int) -> list[str]:
        """Validation cases while training for a test fold: the tuning fold."""
        self._check_test_fold(test_fold)
        return self.tuning_cases()


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def splits_from_dict(
    raw: Any,
    source: str = layout.SPLITS_JSON,
    dataset: DatasetInfo | Iterable[str] | None = None,
) -> Splits:
    """Validate a splits mapping (and, given a dataset, its case ids and subject grouping)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: must hold a JSON object")
    task, seed = raw.get("task"), raw.get("seed", 0)
    if task not in LABELLED_TASKS:
        raise DatasetError(f"{source}: task must be one of {list(LABELLED_TASKS)}, got {task!r}")
    if not isinstance(seed, int):
        problems.append(f"seed must be an integer, got {seed!r}")
    groups: dict[str, list[str]] = {}
    if task == "lesion":
        folds, n_folds, tuning = raw.get("folds"), raw.get("n_folds"), raw.get("tuning_fold")
        if not isinstance(folds, list) or not all(_string_list(f) for f in folds):
            raise DatasetError(f"{source}: folds must be a list of lists of case ids")
        if n_folds is not None and n_folds != len(folds):
            problems.append(f"n_folds is {n_folds} but {len(folds)} folds are listed")
        if not isinstance(tuning, int) or not 0 <= tuning < len(folds):
            problems.append(f"tuning_fold {tuning!r} is out of range 0..{len(folds) - 1}")
        if len(folds) < 2:
            problems.append(f"needs at least 2 folds, got {len(folds)}")
        problems += [f"fold {k} is empty" for k, fold in enumerate(folds) if not fold]
        for k, fold in enumerate(folds):
            groups.update({f"fold {k}": fold})
        splits = Splits(
            "lesion",
            seed,
            tuple(tuple(f) for f in folds),
            tuning if isinstance(tuning, int) else None,
            source=source,
        )
    else:
        train, val = raw.get("train"), raw.get("val")
        if not _string_list(train) or not _string_list(val):
            raise DatasetError(f"{source}: train and val must be lists of case ids")
        problems += [
            f"{name} is empty" for name, part in (("train", train), ("val", val)) if not part
        ]
        groups = {"train": train, "val": val}
        splits = Splits("skeleton", seed, train=tuple(train), val=tuple(val), source=source)

    where: dict[str, str] = {}
    for name, cases in groups.items():
        for case_id in cases:
            if case_id in where:
                problems.append(f"case {case_id} is in both {where[case_id]} and {name}")
            where.setdefault(case_id, name)
    if dataset is not None:
        problems += _dataset_problems(where, dataset)
    if problems:
        raise DatasetError(f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return splits


def _dataset_problems(where: dict[str, str], dataset: DatasetInfo | Iterable[str]) -> list[str]:
    """Case ids unknown to the dataset, cases left out, and subjects split across groups."""
    subjects = dataset.subjects if isinstance(dataset, DatasetInfo) else {c: c for c in dataset}
    problems = [f"case {c} is not in the dataset" for c in sorted(set(where) - set(subjects))]
    missing = sorted(set(subjects) - set(where))
    if missing:
        problems.append(f"dataset cases in no split (re-run sap split): {missing}")
    seen: dict[str, tuple[str, str]] = {}
    for case_id in sorted(where):
        subject = subjects.get(case_id)
        if subject is None:
            continue
        if subject in seen and seen[subject][1] != where[case_id]:
            other, group = seen[subject]
            problems.append(
                f"subject {subject} is split: case {other} in {group}, case {case_id} in "
                f"{where[case_id]}"
            )
        seen.setdefault(subject, (case_id, where[case_id]))
    return problems


def load_splits(
    path: str | os.PathLike, dataset: DatasetInfo | Iterable[str] | None = None
) -> Splits:
    """Read and validate ``splits.json``; with ``dataset``, also check it against the dataset."""
    path = Path(path)
    try:
        raw = read_json(path)
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: no splits file; run sap split") from err
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable splits file ({err})") from err
    return splits_from_dict(raw, source=str(path), dataset=dataset)


def write_splits(path: str | os.PathLike, splits: dict[str, Any], force: bool = False) -> bool:
    """Write ``splits`` atomically; returns ``False`` when an identical file is already there.

    An existing different file is kept unless ``force``: models trained on it would silently
    stop matching their test folds. Checked and written under ``.<name>.lock`` next to it, so
    concurrent fold jobs writing the same splits all succeed.
    """
    path = Path(path)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if path.exists():
            try:
                previous = read_json(path)
            except (OSError, ValueError):
                previous = None
            if previous == splits:
                return False
            if not force:
                raise DatasetError(
                    f"{path}: exists with different splits; pass --force to overwrite it (runs "
                    "trained on the old splits would no longer match their folds)"
                )
        write_json(path, splits)
    return True


def split_dataset(
    root: str | os.PathLike,
    n_folds: int = DataConfig.n_folds,
    tuning_fold: int = DataConfig.tuning_fold,
    seed: int = DataConfig.split_seed,
    val_fraction: float = DataConfig.val_fraction,
    out: str | os.PathLike | None = None,
    connectivity: int = DEFAULT_CONNECTIVITY,
    force: bool = False,
    info: DatasetInfo | None = None,
    lesion_counts: Mapping[str, int] | None = None,
    task: str | None = None,
) -> tuple[Path, Splits, bool]:
    """Validate a dataset, make its splits and write them (default ``default_splits_path``).

    A caller that has just validated the dataset passes ``info``; one that has cached it passes
    the cache's ``lesion_counts`` (:func:`cache_lesion_counts`), so labels are not read again.
    ``task`` names the task when the label set does not say (``--task``): lesion folds or a
    skeleton holdout. Returns the path, the validated splits and whether the file was written.
    """
    if info is None:
        info = require_valid_dataset(root, task=task)
    if info.task == "lesion":
        counts = (
            dict(lesion_counts)
            if lesion_counts is not None
            else count_dataset_lesions(info, connectivity)
        )
        raw = make_lesion_folds(
            info.case_ids,
            [counts[c] for c in info.case_ids],
            [info.subjects[c] for c in info.case_ids],
            n_folds,
            tuning_fold,
            seed,
        )
        raw["connectivity"] = connectivity
    else:
        raw = make_holdout_split(
            info.case_ids, [info.subjects[c] for c in info.case_ids], val_fraction, seed
        )
    path = Path(out) if out is not None else layout.default_splits_path(info.root)
    splits = splits_from_dict(raw, source=str(path), dataset=info)
    written = write_splits(path, raw, force=force)
    return path, splits, written
