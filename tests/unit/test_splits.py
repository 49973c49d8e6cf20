"""Splits: stratification by lesion count, grouping by subject, determinism, protocol, validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.cache.splits import (
    load_splits,
    make_holdout_split,
    make_lesion_folds,
    split_dataset,
    splits_from_dict,
)
from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset.info import load_dataset
from tests.datasets import write_tiny_dataset


def _cohort(n_subjects: int, max_scans: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """Case ids, skewed lesion counts (many few-lesion patients, a long tail) and subjects."""
    rng = np.random.default_rng(seed)
    cases, counts, subjects = [], [], []
    for s in range(n_subjects):
        for scan in range(int(rng.integers(1, max_scans + 1))):
            cases.append(f"s{s:02d}_scan{scan}")
            counts.append(int(rng.geometric(0.15)) - 1)
            subjects.append(f"s{s:02d}")
    return cases, counts, subjects


def _fold_of(folds: list[list[str]]) -> dict[str, int]:
    return {case: k for k, fold in enumerate(folds) for case in fold}


# --------------------------------------------------------------------------- lesion folds


def test_distinct_counts_put_one_subject_of_every_bin_in_every_fold() -> None:
    rng = np.random.default_rng(0)
    counts = [int(v) for v in rng.permutation(42)]  # 42 patients, all counts distinct
    cases = [f"p{i:02d}" for i in range(42)]
    splits = make_lesion_folds(cases, counts, cases, n_folds=7, tuning_fold=0, seed=5)
    fold_of = _fold_of(splits["folds"])
    by_count = sorted(cases, key=lambda c: -counts[cases.index(c)])
    for start in range(0, 42, 7):  # the 7 patients ranked start..start+6 by lesion count
        assert sorted(fold_of[c] for c in by_count[start : start + 7]) == list(range(7))
    assert [len(f) for f in splits["folds"]] == [6] * 7


def test_lesion_count_distribution_is_balanced_across_folds() -> None:
    cases, counts, _ = _cohort(n_subjects=40, max_scans=1, seed=1)
    splits = make_lesion_folds(cases, counts, cases, n_folds=7, tuning_fold=0, seed=3)
    count_of = dict(zip(cases, counts))
    totals = [sum(count_of[c] for c in fold) for fold in splits["folds"]]
    # One patient of every bin per fold bounds the totals' spread by the count range ...
    assert max(totals) - min(totals) <= max(counts) - min(counts)
    # ... and the per-fold medians stay close to the cohort median.
    medians = [np.median([count_of[c] for c in fold]) for fold in splits["folds"]]
    spread = np.percentile(counts, 75) - np.percentile(counts, 25)
    assert max(abs(m - np.median(counts)) for m in medians) <= spread
    assert sorted(len(f) for f in splits["folds"]) == [5, 5, 6, 6, 6, 6, 6]
    assert splits["lesion_counts"] == {c: count_of[c] for c in sorted(cases)}


def test_folds_group_scans_by_subject_and_keep_sizes_even() -> None:
    cases, counts, subjects = _cohort(n_subjects=21, max_scans=4, seed=2)
    splits = make_lesion_folds(cases, counts, subjects, n_folds=7, tuning_fold=3, seed=0)
    fold_of = _fold_of(splits["folds"])
    assert sorted(fold_of) == sorted(cases)  # every case exactly once
    assert sum(len(f) for f in splits["folds"]) == len(cases)
    for subject in set(subjects):
        assert len({fold_of[c] for c, s in zip(cases, subjects) if s == subject}) == 1
    sizes = [len(f) for f in splits["folds"]]
    assert max(sizes) - min(sizes) <= max(Counter(subjects).values())


def test_folds_are_deterministic_for_a_seed() -> None:
    cases, counts, subjects = _cohort(n_subjects=14, max_scans=3, seed=4)
    first = make_lesion_folds(cases, counts, subjects, n_folds=7, tuning_fold=0, seed=11)
    again = make_lesion_folds(cases, counts, subjects, n_folds=7, tuning_fold=0, seed=11)
    order = np.random.default_rng(0).permutation(len(cases))  # input order does not matter
    shuffled = make_lesion_folds(
        [cases[i] for i in order],
        [counts[i] for i in order],
        [subjects[i] for i in order],
        n_folds=7,
        tuning_fold=0,
        seed=11,
    )
    other = make_lesion_folds(cases, counts, subjects, n_folds=7, tuning_fold=0, seed=12)
    assert first == again == shuffled
    assert other["folds"] != first["folds"]


def test_too_few_subjects_or_bad_fold_numbers_are_refused() -> None:
    cases = [f"c{i}" for i in range(10)]
    subjects = [f"s{i // 2}" for i in range(10)]  # 5 subjects
    with pytest.raises(DatasetError, match="10 cases of 5 subjects cannot fill 7 folds"):
        make_lesion_folds(cases, [1] * 10, subjects, n_folds=7, tuning_fold=0, seed=0)
    with pytest.raises(DatasetError, match=r"tuning fold 5 is out of range 0\.\.4"):
        make_lesion_folds(cases, [1] * 10, subjects, n_folds=5, tuning_fold=5, seed=0)
    with pytest.raises(DatasetError, match="at least 2"):
        make_lesion_folds(cases, [1] * 10, subjects, n_folds=1, tuning_fold=0, seed=0)
    with pytest.raises(DatasetError, match="listed twice"):
        make_lesion_folds(["a", "a", "b"], [1, 1, 1], ["a", "b", "c"], n_folds=2, tuning_fold=0)


def test_protocol_helpers_follow_the_clean_variant() -> None:
    cases, counts, subjects = _cohort(n_subjects=28, max_scans=2, seed=6)
    splits = splits_from_dict(
        make_lesion_folds(cases, counts, subjects, n_folds=7, tuning_fold=2, seed=0)
    )
    assert splits.test_folds == [0, 1, 3, 4, 5, 6]
    tuning = set(splits.tuning_cases())
    for k in splits.test_folds:
        train, test = set(splits.train_cases(k)), set(splits.test_cases(k))
        assert train == set(cases) - test - tuning  # never trains on the tuning fold or fold k
        assert not train & test and not train & tuning and not test & tuning
        assert splits.val_cases(k) == sorted(tuning)
    # The test folds together hold every case outside the tuning fold exactly once.
    tested = [c for k in splits.test_folds for c in splits.test_cases(k)]
    assert sorted(tested) == sorted(set(cases) - tuning)
    with pytest.raises(DatasetError, match="fold 2 is the tuning fold"):
        splits.test_cases(2)
    with pytest.raises(DatasetError, match="fold 9 is out of range"):
        splits.train_cases(9)


# --------------------------------------------------------------------------- holdout


def test_holdout_is_grouped_deterministic_and_near_the_fraction() -> None:
    cases, _, subjects = _cohort(n_subjects=24, max_scans=5, seed=7)  # paper-like: ~71 scans
    split = make_holdout_split(cases, subjects, val_fraction=0.125, seed=0)
    assert split == make_holdout_split(cases, subjects, val_fraction=0.125, seed=0)
    assert split["val"] != make_holdout_split(cases, subjects, val_fraction=0.125, seed=1)["val"]
    train, val = set(split["train"]), set(split["val"])
    assert train | val == set(cases) and not train & val
    subject_of = dict(zip(cases, subjects))
    assert not {subject_of[c] for c in train} & {subject_of[c] for c in val}
    target = round(0.125 * len(cases))
    assert target - max(Counter(subjects).values()) < len(val) <= target
    loaded = splits_from_dict(split, dataset=cases)
    assert (loaded.task, sorted(loaded.val)) == ("skeleton", sorted(val))
    with pytest.raises(DatasetError, match="no cross-validation folds"):
        loaded.tuning_cases()


def test_holdout_refuses_a_single_subject() -> None:
    with pytest.raises(DatasetError, match="cannot be split"):
        make_holdout_split(["a", "b"], ["s", "s"], val_fraction=0.5, seed=0)


# --------------------------------------------------------------------------- validation


def _valid_lesion_splits() -> dict:
    return {"task": "lesion", "n_folds": 3, "tuning_fold": 0, "seed": 0,
            "folds": [["a", "b"], ["c"], ["d", "e"]]}  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["folds"][1].append("zz"), "case zz is not in the dataset"),
        (lambda s: s["folds"][2].append("a"), "case a is in both fold 0 and fold 2"),
        (lambda s: s.update(tuning_fold=3), "tuning_fold 3 is out of range 0..2"),
        (lambda s: s.update(n_folds=4), "n_folds is 4 but 3 folds are listed"),
        (
            lambda s: s["folds"][2].remove("e"),
            "dataset cases in no split (re-run sap split): ['e']",
        ),
        (lambda s: s["folds"].append([]), "fold 3 is empty"),
        (lambda s: s.update(task="organs"), "task must be one of"),
    ],
)
def test_splits_validation_names_the_problem(edit, message: str) -> None:
    raw = _valid_lesion_splits()
    splits_from_dict(raw, dataset=["a", "b", "c", "d", "e"])  # valid before the edit
    edit(raw)
    with pytest.raises(DatasetError) as raised:
        splits_from_dict(raw, dataset=["a", "b", "c", "d", "e"])
    assert message in str(raised.value)


def test_load_splits_checks_subject_grouping_against_the_dataset(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=4, lesions_per_case=1)
    spec = json.loads((root / "dataset.json").read_text())
    spec["subjects"] = {"case000": "S", "case003": "S"}
    (root / "dataset.json").write_text(json.dumps(spec))
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"task": "lesion", "n_folds": 2, "tuning_fold": 0, "seed": 0,
                                "folds": [["case000", "case001"], ["case002", "case003"]]}))  # fmt: skip
    with pytest.raises(
        DatasetError, match="subject S is split: case case000 in fold 0, case case003"
    ):
        load_splits(path, dataset=load_dataset(root))
    assert load_splits(path).n_folds == 2  # without a dataset only the file itself is checked
    path.write_text("{")
    with pytest.raises(DatasetError, match="unreadable splits file"):
        load_splits(path)
    with pytest.raises(DatasetError, match="no splits file"):
        load_splits(tmp_path / "absent.json")


# --------------------------------------------------------------------------- from a dataset


def test_split_dataset_counts_lesions_and_writes_atomically(tmp_path: Path) -> None:
    counts = [0, 1, 2, 3, 4, 1, 2, 5]
    root = write_tiny_dataset(
        tmp_path / "ds", n_cases=8, lesions_per_case=counts, shape=(24, 24, 16)
    )
    path, splits, written = split_dataset(root, n_folds=4, tuning_fold=1, seed=3)
    assert written and path == root / "splits.json"
    raw = json.loads(path.read_text())
    for case_id, count in raw["lesion_counts"].items():  # against scipy on the same files
        label = np.asanyarray(nib.load(root / f"labelsTr/{case_id}.nii.gz").dataobj)
        assert ndimage.label(label > 0)[1] == count
    assert sorted(raw["lesion_counts"].values()) == sorted(counts)
    assert load_splits(path, dataset=load_dataset(root)) == splits
    assert splits.tuning_fold == 1 and splits.n_folds == 4

    assert split_dataset(root, n_folds=4, tuning_fold=1, seed=3)[2] is False  # identical: no-op
    with pytest.raises(DatasetError, match="exists with different splits"):
        split_dataset(root, n_folds=4, tuning_fold=1, seed=4)
    assert json.loads(path.read_text()) == raw  # the old file is kept
    assert split_dataset(root, n_folds=4, tuning_fold=1, seed=4, force=True)[2] is True


def test_split_dataset_makes_a_holdout_for_skeleton_data(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "sk", n_cases=8, task="skeleton", lesions_per_case=3)
    out = tmp_path / "elsewhere" / "splits.json"
    path, splits, _ = split_dataset(root, seed=0, val_fraction=0.25, out=out)
    assert path == out and not (root / "splits.json").exists()
    assert splits.task == "skeleton" and len(splits.val) == 2 and len(splits.train) == 6
