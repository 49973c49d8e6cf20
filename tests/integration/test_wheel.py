"""A wheel built from the repository, installed in a fresh environment outside any checkout,
runs ``sap study`` end to end: the experiment files ship as package data, ``py.typed`` ships,
and ``--config`` accepts packaged names such as ``study/demo``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_STUDY = [
    "healthy=3",
    "patients=6",
    "n_folds=3",
    "phantom_shape=[64,64,128]",
    "phantom_spacing=[4.5,4.5,9.0]",
    "n_resamples=20",
    "overrides=[logger=csv,trainer.enable_progress_bar=false,trainer.max_epochs=1,"
    "trainer.limit_train_batches=2,'model.kwargs.features=[2,4,4,4,4,2]',"
    "data.samples_per_volume=1,data.queue_length=2,'validation.roi_size=[64,64,64]']",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("sap_lightning-*.whl")
    return built


def test_the_wheel_carries_experiments_and_type_information(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sap_lightning/py.typed" in names
    for name in ("cpu/pretrain", "paper/finetune_sap", "study/demo", "sweeps/arms_cpu"):
        assert f"sap_lightning/experiments/{name}.yaml" in names
    assert not any(name.startswith(("tests/", "experiments/")) for name in names)


@pytest.mark.slow
def test_an_installed_wheel_runs_the_study_outside_a_checkout(wheel: Path, tmp_path: Path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Dependencies come from the test environment (appended after the new site-packages, whose
    # .pth files are not run: the editable checkout stays invisible); the package from the wheel.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "work"  # no checkout, no experiments/ folder here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import sap_lightning; print(sap_lightning.__file__)"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert str(site) in where.stdout, "the wheel, not the checkout, must be imported"
    study = subprocess.run(
        [python, "-m", "sap_lightning", "study", "--config", "study/demo", *TINY_STUDY],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    report = work / "reports" / "demo" / "report.md"
    assert report.is_file() and "Table 1" in report.read_text()
