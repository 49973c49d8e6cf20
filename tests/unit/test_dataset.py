"""Dataset structure, validation (every failure kind, named by case and file) and import."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import file_checks
from sap_lightning.dataset.file_checks import AFFINE_TOLERANCE_MM
from sap_lightning.dataset.import_folder import import_folder
from sap_lightning.dataset.info import load_dataset, read_case_arrays
from sap_lightning.dataset.spec import Problem
from sap_lightning.dataset.validate import check_dataset, require_valid_dataset
from tests.datasets import affine_for, save, truncate, write_authors_folder, write_tiny_dataset

SHAPE = (20, 16, 12)
SPACING = (1.5, 1.5, 4.0)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "ds", n_cases=3, shape=SHAPE, spacing=SPACING)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _edit_json(root: Path, edit: Callable[[dict], None]) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    edit(spec)
    (root / "dataset.json").write_text(json.dumps(spec))


# --------------------------------------------------------------------------- structure


def test_load_dataset_lists_cases_channels_and_subjects(dataset: Path) -> None:
    _edit_json(dataset, lambda s: s.update(subjects={"case000": "A", "case001": "A"}))
    info = load_dataset(dataset)
    assert info.case_ids == ["case000", "case001", "case002"]
    assert info.channel_names == ("T1", "b1000")
    assert info.task == "lesion"
    assert info.subjects == {"case000": "A", "case001": "A", "case002": "case002"}
    case = info.case("case001")
    assert case.images == (
        dataset / "imagesTr" / "case001_0000.nii.gz",
        dataset / "imagesTr" / "case001_0001.nii.gz",
    )
    assert case.label == dataset / "labelsTr" / "case001.nii.gz"
    with pytest.raises(DatasetError, match="no case 'case999'"):
        info.case("case999")


def test_skeleton_dataset_task(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "sk", n_cases=2, task="skeleton", lesions_per_case=4)
    assert load_dataset(root).task == "skeleton"
    assert check_dataset(root) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "dataset.json: missing"), ("{oops", "malformed JSON"), ("[1, 2]", "JSON object")],
)
def test_load_dataset_refuses_missing_or_malformed_json(
    dataset: Path, content: str | None, message: str
) -> None:
    if content is None:
        (dataset / "dataset.json").unlink()
    else:
        (dataset / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(dataset)


def test_read_case_arrays_matches_nibabel(dataset: Path) -> None:
    case = load_dataset(dataset).case("case002")
    image, label, affine = read_case_arrays(case)
    assert image.shape == (2, *SHAPE) and image.dtype == np.float32
    assert label is not None and label.dtype == np.uint8 and label.shape == SHAPE
    for channel in range(2):
        expected, _ = _load(case.images[channel])
        np.testing.assert_array_equal(image[channel], expected)
    np.testing.assert_array_equal(label, _load(case.label)[0])
    np.testing.assert_allclose(affine, affine_for(SPACING, origin=(-10.0, 5.0, 2.5)))


# --------------------------------------------------------------------------- check: one kind each


def _rewrite(path: Path, transform: Callable[[np.ndarray, np.ndarray], tuple]) -> None:
    data, affine = _load(path)
    new_data, new_affine = transform(np.array(data), np.array(affine))
    path.unlink()
    save(path, new_data, new_affine)


def _with_nan(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = data.astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    return data, affine


def _shifted(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine[0, 3] += 0.5
    return data, affine


def _non_integer(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = data.astype(np.float32)
    data[2, 2, 2] = 0.5
    return data, affine


def _undeclared(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data[3, 3, 3], data[4, 4, 4] = 3, 7
    return data, affine


def _duplicate_by_letter_case(root: Path) -> None:
    for channel in range(2):
        shutil.copy(
            root / f"imagesTr/case000_{channel:04d}.nii.gz",
            root / f"imagesTr/CASE000_{channel:04d}.nii.gz",
        )
    shutil.copy(root / "labelsTr/case000.nii.gz", root / "labelsTr/CASE000.nii.gz")
    _edit_json(root, lambda s: s.update(numTraining=4))


def _subjects_declared_twice(root: Path) -> None:
    text = (root / "dataset.json").read_text().rstrip().rstrip("}")
    text += ', "subjects": {"case000": "A", "case001": "B", "case000": "C"}}'
    (root / "dataset.json").write_text(text)


def _empty(root: Path) -> None:
    for folder in ("imagesTr", "labelsTr"):
        for path in (root / folder).iterdir():
            path.unlink()


# (mutation of a valid 3-case dataset, expected case, expected file, expected message fragment)
FAILURES: dict[str, tuple[Callable[[Path], None], str | None, str, str]] = {
    "dataset_json_missing": (
        lambda r: (r / "dataset.json").unlink(),
        None,
        "dataset.json",
        "missing",
    ),
    "dataset_json_bad_json": (
        lambda r: (r / "dataset.json").write_text('{"labels": {'),
        None,
        "dataset.json",
        "malformed JSON",
    ),
    "dataset_json_missing_key": (
        lambda r: _edit_json(r, lambda s: s.pop("channel_names")),
        None,
        "dataset.json",
        "missing key 'channel_names'",
    ),
    "dataset_json_wrong_type": (
        lambda r: _edit_json(r, lambda s: s.update(labels={"background": "0", "lesion": "1"})),
        None,
        "dataset.json",
        "labels values must be integers",
    ),
    "dataset_json_channel_list": (
        lambda r: _edit_json(r, lambda s: s.update(channel_names=["T1", "b1000"])),
        None,
        "dataset.json",
        "channel_names must be a non-empty object",
    ),
    "declared_twice": (_subjects_declared_twice, None, "dataset.json", "'case000' declared twice"),
    "corrupt_gzip": (
        lambda r: truncate(r / "imagesTr/case001_0000.nii.gz"),
        "case001",
        "imagesTr/case001_0000.nii.gz",
        "corrupt",
    ),
    "not_nifti": (
        lambda r: (r / "labelsTr/case002.nii.gz").write_bytes(b"not a nifti file at all"),
        "case002",
        "labelsTr/case002.nii.gz",
        "unreadable",
    ),
    "missing_channel": (
        lambda r: (r / "imagesTr/case002_0001.nii.gz").unlink(),
        "case002",
        "imagesTr/case002_0001.nii.gz",
        "missing channel 1 (b1000)",
    ),
    "missing_label": (
        lambda r: (r / "labelsTr/case000.nii.gz").unlink(),
        "case000",
        "labelsTr/case000.nii.gz",
        "missing label",
    ),
    "label_without_images": (
        lambda r: shutil.copy(r / "labelsTr/case000.nii.gz", r / "labelsTr/case099.nii.gz"),
        "case099",
        "labelsTr/case099.nii.gz",
        "label without images",
    ),
    "not_3d": (
        lambda r: _rewrite(
            r / "imagesTr/case001_0001.nii.gz", lambda d, a: (np.stack([d, d], axis=-1), a)
        ),
        "case001",
        "imagesTr/case001_0001.nii.gz",
        "not a 3D volume: shape (20, 16, 12, 2)",
    ),
    "shape_mismatch": (
        lambda r: _rewrite(r / "imagesTr/case001_0001.nii.gz", lambda d, a: (d[:, :, :-1], a)),
        "case001",
        "imagesTr/case001_0001.nii.gz",
        "shape (20, 16, 11) differs from imagesTr/case001_0000.nii.gz (20, 16, 12)",
    ),
    "label_shape_mismatch": (
        lambda r: _rewrite(r / "labelsTr/case002.nii.gz", lambda d, a: (d[1:], a)),
        "case002",
        "labelsTr/case002.nii.gz",
        "shape (19, 16, 12) differs",
    ),
    "affine_mismatch": (
        lambda r: _rewrite(r / "labelsTr/case000.nii.gz", _shifted),
        "case000",
        "labelsTr/case000.nii.gz",
        "affine differs from imagesTr/case000_0000.nii.gz by up to 0.5 mm",
    ),
    "nan_inf_voxels": (
        lambda r: _rewrite(r / "imagesTr/case002_0000.nii.gz", _with_nan),
        "case002",
        "imagesTr/case002_0000.nii.gz",
        "4 NaN/Inf voxels",
    ),
    "undeclared_label_values": (
        lambda r: _rewrite(r / "labelsTr/case001.nii.gz", _undeclared),
        "case001",
        "labelsTr/case001.nii.gz",
        "label values [3, 7] not declared",
    ),
    "non_integer_label": (
        lambda r: _rewrite(r / "labelsTr/case001.nii.gz", _non_integer),
        "case001",
        "labelsTr/case001.nii.gz",
        "1 non-integer label values",
    ),
    "duplicate_case_letter_case": (
        _duplicate_by_letter_case,
        "case000",
        "imagesTr/case000_0000.nii.gz",
        "differ only by letter case",
    ),
    "empty_dataset": (_empty, None, "imagesTr", "no cases"),
    "unexpected_file": (
        lambda r: (r / "imagesTr/notes.txt").write_text("x"),
        None,
        "imagesTr/notes.txt",
        "unexpected entry",
    ),
    "undeclared_channel": (
        lambda r: shutil.copy(
            r / "imagesTr/case000_0000.nii.gz", r / "imagesTr/case000_0002.nii.gz"
        ),
        "case000",
        "imagesTr/case000_0002.nii.gz",
        "channel 2 is not declared",
    ),
    "num_training_mismatch": (
        lambda r: _edit_json(r, lambda s: s.update(numTraining=5)),
        None,
        "dataset.json",
        "numTraining is 5 but 3 cases",
    ),
    "subject_of_unknown_case": (
        lambda r: _edit_json(r, lambda s: s.update(subjects={"case777": "A"})),
        "case777",
        "dataset.json",
        "no images",
    ),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_check_reports_each_failure_kind_with_case_and_file(dataset: Path, kind: str) -> None:
    mutate, case, file, message = FAILURES[kind]
    assert check_dataset(dataset) == []  # the fixture is valid before the mutation
    mutate(dataset)
    problems = check_dataset(dataset)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert (problem.case, problem.file) == (case, file)
    assert message in problem.message
    where = f"case {case}" if case else "dataset"
    assert str(problem).startswith(f"{where}: {file}: ")


def test_affine_within_tolerance_is_accepted(dataset: Path) -> None:
    def nudge(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        affine[:3, 3] += AFFINE_TOLERANCE_MM / 4
        return data, affine

    _rewrite(dataset / "labelsTr/case000.nii.gz", nudge)
    assert check_dataset(dataset) == []


def test_skeleton_reference_maps_are_checked(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=2, skeleton_reference=True)
    assert check_dataset(root) == []
    _rewrite(root / "skeletonTr/case001.nii.gz", _undeclared)  # 7 is a skeleton class, 3 too
    _rewrite(root / "skeletonTr/case000.nii.gz", lambda d, a: (d + 10, a))
    shutil.copy(root / "skeletonTr/case001.nii.gz", root / "skeletonTr/case005.nii.gz")
    problems = check_dataset(root)
    assert [(p.case, p.file) for p in problems] == [
        ("case000", "skeletonTr/case000.nii.gz"),
        ("case005", "skeletonTr/case005.nii.gz"),
    ]
    assert "not declared in the skeleton label set" in problems[0].message
    assert "skeleton reference without images" in problems[1].message


def test_voxel_statistics_are_exact_when_read_slab_by_slab(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-body volumes are scanned in slabs; counts must not depend on the slab size."""

    def scatter(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data = data.astype(np.float32)
        data[0, 0, 0], data[19, 15, 11], data[10, 3, 5] = 4, 250, 0.25
        return np.asfortranarray(data), affine

    _rewrite(dataset / "imagesTr/case000_0000.nii.gz", _with_nan)
    _rewrite(dataset / "labelsTr/case001.nii.gz", scatter)
    expected = [str(p) for p in check_dataset(dataset)]
    monkeypatch.setattr(file_checks, "_CHUNK_VOXELS", 37)  # many slabs of 1 slice each
    assert [str(p) for p in check_dataset(dataset)] == expected
    assert expected == [
        "case case000: imagesTr/case000_0000.nii.gz: 4 NaN/Inf voxels",
        "case case001: labelsTr/case001.nii.gz: 1 non-integer label values",
        "case case001: labelsTr/case001.nii.gz: label values [4, 250] not declared in "
        "dataset.json labels",
    ]


def test_missing_labels_allowed_when_not_required(dataset: Path) -> None:
    shutil.rmtree(dataset / "labelsTr")
    assert check_dataset(dataset, require_labels=False) == []
    assert check_dataset(dataset) == [Problem(None, "labelsTr", "missing folder")]


def test_check_reports_every_problem_at_once(dataset: Path) -> None:
    truncate(dataset / "imagesTr/case000_0001.nii.gz")
    (dataset / "labelsTr/case001.nii.gz").unlink()
    _rewrite(dataset / "imagesTr/case002_0000.nii.gz", _with_nan)
    _rewrite(dataset / "labelsTr/case002.nii.gz", _undeclared)
    shutil.copy(dataset / "labelsTr/case000.nii.gz", dataset / "labelsTr/case042.nii.gz")
    problems = check_dataset(dataset)
    assert {(p.case, p.file) for p in problems} == {
        ("case000", "imagesTr/case000_0001.nii.gz"),
        ("case001", "labelsTr/case001.nii.gz"),
        ("case002", "imagesTr/case002_0000.nii.gz"),
        ("case002", "labelsTr/case002.nii.gz"),
        ("case042", "labelsTr/case042.nii.gz"),
    }
    # Reading files in parallel finds exactly the same problems.
    assert check_dataset(dataset, workers=2) == problems

    with pytest.raises(DatasetError) as raised:
        require_valid_dataset(dataset)
    text = str(raised.value)
    assert "5 problems" in text
    for problem in problems:
        assert str(problem) in text


def test_dataset_json_problems_and_file_problems_together(dataset: Path) -> None:
    _edit_json(dataset, lambda s: s.update(labels={"lesion": 1}, file_ending=".png"))
    (dataset / "imagesTr/case001_0000.nii.gz").unlink()
    problems = check_dataset(dataset)
    messages = [str(p) for p in problems]
    assert any("'background' to 0" in m for m in messages)
    assert any("file_ending must be one of" in m for m in messages)
    assert any(
        "case case001: imagesTr/case001_0000.nii.gz: missing channel 0" in m for m in messages
    )


def test_require_valid_dataset_returns_structure(dataset: Path) -> None:
    info = require_valid_dataset(dataset)
    assert info.case_ids == ["case000", "case001", "case002"]


# --------------------------------------------------------------------------- import


def test_import_folder_converts_the_authors_layout(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=3)
    save(
        src / "pat01" / "skeleton.nii.gz",
        np.ones((20, 16, 12), np.uint8),
        affine_for((1.5, 1.5, 4)),
    )
    out = tmp_path / "out"
    info = import_folder(src, out, labels="lesion", subjects={"pat00": "S1", "pat01": "S1"})
    assert info.case_ids == ["pat00", "pat01", "pat02"]
    assert info.task == "lesion"
    assert info.subjects == {"pat00": "S1", "pat01": "S1", "pat02": "pat02"}
    assert check_dataset(out) == []
    case = info.case("pat02")
    assert case.images[0].read_bytes() == (src / "pat02/T1.nii.gz").read_bytes()
    assert case.images[1].read_bytes() == (src / "pat02/b1000.nii.gz").read_bytes()
    assert case.label.read_bytes() == (src / "pat02/lesions.nii.gz").read_bytes()
    assert info.skeleton_reference("pat01") is not None
    assert info.skeleton_reference("pat00") is None
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1", "1": "b1000"}
    assert spec["labels"] == {"background": 0, "lesion": 1}
    assert spec["numTraining"] == 3


def test_import_skeleton_with_custom_label_set_and_uncompressed_input(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=2, task="skeleton")
    for case_dir in src.iterdir():  # an uncompressed channel is compressed on import
        data, affine = _load(case_dir / "T1.nii.gz")
        (case_dir / "T1.nii.gz").unlink()
        save(case_dir / "T1.nii", data, affine)
        (case_dir / "skeleton.nii.gz").rename(case_dir / "bones.nii.gz")
    label_file = tmp_path / "labels.json"
    label_file.write_text(
        json.dumps({"labels": {"background": 0} | {f"c{v}": v for v in range(1, 10)}})
    )
    info = import_folder(src, tmp_path / "out", labels=label_file, label_name="bones")
    # Nine classes that are not the library's skeleton set: the task must be named.
    (undecided,) = check_dataset(info.root)
    assert (undecided.case, undecided.file) == (None, "dataset.json")
    assert "--task lesion" in undecided.message and "--task skeleton" in undecided.message
    assert check_dataset(info.root, task="skeleton") == []
    data, _ = _load(info.case("pat00").images[0])
    np.testing.assert_array_equal(data, _load(src / "pat00/T1.nii")[0])


def test_import_names_every_missing_file_and_writes_nothing(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=3)
    (src / "pat01/b1000.nii.gz").unlink()
    (src / "pat02/lesions.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as raised:
        import_folder(src, out, labels="lesion")
    text = str(raised.value)
    assert f"case pat01: {src / 'pat01' / 'b1000'}.nii.gz: missing channel" in text
    assert f"case pat02: {src / 'pat02' / 'lesions'}.nii.gz: missing label" in text
    assert not out.exists()


def test_import_refuses_an_invalid_label_set(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=1)
    label_file = tmp_path / "labels.json"
    label_file.write_text(json.dumps({"background": 0, "lesion": 2}))
    with pytest.raises(
        DatasetError, match=r"labels\.json: labels values must be the integers 0\.\.1"
    ):
        import_folder(src, tmp_path / "out", labels=label_file)
    assert not (tmp_path / "out").exists()


def test_import_refuses_non_empty_output(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        import_folder(src, out, labels="lesion")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    # An existing empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_folder(src, empty).case_ids == ["pat00", "pat01"]
