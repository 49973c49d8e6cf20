"""The data commands start fast: none imports torch, Lightning, MONAI, TorchIO or torchmetrics.

Importing torch alone costs more CPU than a whole ``sap preprocess`` of an unchanged dataset
(``benchmarks/bench_startup.py``). Each command runs to completion (``--help``, then for real on
a small dataset) in a fresh interpreter (``_imports_probe.py``), which reports what is in
``sys.modules`` afterwards: a new top-level ``import torch`` anywhere on these paths, or a lazy
one the command reaches, fails here and names the importing line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sap_lightning.cli import COMMANDS, TORCH_FREE_COMMANDS
from tests.datasets import affine_for, save, write_authors_folder, write_tiny_dataset
from tests.dicom_exams import ExamSpec, write_dicom_exam

PROBE = Path(__file__).with_name("_imports_probe.py")
DATA_COMMANDS = (
    "check-data",
    "preprocess",
    "split",
    "import-folder",
    "make-phantoms",
    "skeleton-labels",
    "import-dicom",
)
"""The commands issue 30 names as needing no network: they must stay torch-free."""


def _probe(*argv: str) -> dict:
    """Run ``sap argv`` in a fresh interpreter; its exit status and the watched modules loaded."""
    done = subprocess.run(
        [sys.executable, str(PROBE), *argv], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("IMPORTS-PROBE ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("IMPORTS-PROBE "))
    report["output"] = done.stdout + done.stderr
    return report


def _assert_torch_free(report: dict, argv: str) -> None:
    assert report["status"] == 0, f"sap {argv} failed:\n{report['output'][-3000:]}"
    loaded = {name: " <- ".join(frames) or "?" for name, frames in report["loaded"].items()}
    assert not loaded, f"sap {argv} imported {loaded}"


def test_the_torch_free_commands_are_the_data_commands() -> None:
    assert set(DATA_COMMANDS) == TORCH_FREE_COMMANDS
    assert set(COMMANDS) >= TORCH_FREE_COMMANDS


@pytest.mark.parametrize("argv", [[], ["--help"], *[[c, "--help"] for c in DATA_COMMANDS]])
def test_help_imports_no_torch(argv: list[str]) -> None:
    _assert_torch_free(_probe(*argv), " ".join(argv))


def test_the_probe_sees_torch_where_a_command_uses_it(tmp_path: Path) -> None:
    """The check can fail: a checkpoint command loads torch, and the probe names who did."""
    report = _probe("inspect-checkpoint", str(tmp_path / "missing.ckpt"))
    assert report["status"] != 0  # no such checkpoint, found after torch was loaded
    frames = report["loaded"].get("torch")
    assert frames and frames[-1].startswith("cli.py:"), report["loaded"]


@pytest.fixture(scope="module")
def lesion_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("startup") / "ds", n_cases=4)


def test_check_data_preprocess_and_split_import_no_torch(lesion_dataset: Path) -> None:
    for argv in (
        ["check-data", str(lesion_dataset)],
        ["preprocess", str(lesion_dataset)],
        ["preprocess", str(lesion_dataset)],  # the second run: an unchanged dataset
        ["split", str(lesion_dataset), "--folds", "2", "--tuning-fold", "0"],
    ):
        _assert_torch_free(_probe(*argv), " ".join(argv))


def test_import_folder_imports_no_torch(tmp_path: Path) -> None:
    src = write_authors_folder(tmp_path / "src", n_cases=2)
    argv = ["import-folder", str(src), str(tmp_path / "ds")]
    _assert_torch_free(_probe(*argv), " ".join(argv))


def test_make_phantoms_imports_no_torch(tmp_path: Path) -> None:
    argv = ["make-phantoms", str(tmp_path / "cohort"), "--size", "tiny"]
    _assert_torch_free(_probe(*argv, "--healthy", "1", "--patients", "1"), " ".join(argv))


def test_skeleton_labels_imports_no_torch(tmp_path: Path) -> None:
    shape, affine = (8, 8, 24), affine_for((3.0, 3.0, 4.0))
    rng = np.random.default_rng(0)
    for channel in (0, 1):
        image = rng.random(shape).astype(np.float32)
        save(tmp_path / "images" / f"c_{channel:04d}.nii.gz", image, affine)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:6, 2:6, 0:6] = 38  # total_mr hip_left
    save(tmp_path / "seg" / "c.nii.gz", label, affine)
    argv = ["skeleton-labels", str(tmp_path / "ds"), "--tool", "total_mr"]
    argv += ["--labels", str(tmp_path / "seg"), "--images", str(tmp_path / "images")]
    _assert_torch_free(_probe(*argv), " ".join(argv))


def test_import_dicom_imports_no_torch(tmp_path: Path) -> None:
    from sap_lightning.dataset.layout import affine_from_spacing
    from sap_lightning.synthetic import SIZES, generate_patient_case

    shape, spacing = SIZES["tiny"]
    case = generate_patient_case(0, 1, shape, spacing)
    write_dicom_exam(
        tmp_path / "src" / "pat1",
        case.t1,
        case.b1000,
        affine_from_spacing(spacing),
        ExamSpec(stations=2),
        body=case.maps.tissue > 0,
    )
    argv = ["import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]
    _assert_torch_free(_probe(*argv), " ".join(argv))
