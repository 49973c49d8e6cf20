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
def test_an_installed_wheel_resolves_every_experiment_outside_a_checkout(
    wheel: Path, tmp_path: Path
):
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
    # Every packaged experiment, and every run file of every packaged study, resolves and
    # composes from the installed package alone (no study is trained here: the suite's one
    # study runs in tests/conftest.py).
    check = subprocess.run([python, "-c", RESOLVE_EVERY_EXPERIMENT], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    resolved = check.stdout.split()
    assert "study/demo:sap:experiments/cpu/finetune_sap.yaml" in resolved
    assert "study/resenc:mae:experiments/cpu/mae.yaml" in resolved
    assert "paper/finetune_sap" in resolved and "cpu/pretrain" in resolved
    help_text = subprocess.run([python, "-m", "sap_lightning", "study", "--help"], cwd=work,
                               env=env, capture_output=True, text=True)  # fmt: skip
    assert help_text.returncode == 0 and "--config" in help_text.stdout


RESOLVE_EVERY_EXPERIMENT = """
from sap_lightning.config import load_config, load_study_config
from sap_lightning.config.files import list_experiments
from sap_lightning.core.arms import get_arm
from sap_lightning.pipeline.study import experiment_file, pretraining_runs

for name in list_experiments():
    if name.startswith("study/"):
        study = load_study_config(name)
        for run in pretraining_runs(study):
            load_config(run.config, extra_files=study.bases)
            print(f"{name}:{run.arm.name}:{run.config}")
        for arm in study.arms:
            path = experiment_file(study, get_arm(arm).finetune_experiment)
            load_config(path, extra_files=study.bases)
            print(f"{name}:{arm}:{path}")
    elif not name.startswith(("sweeps/", "base/", "hardware/", "backbones/")):
        load_config(name)
        print(name)
"""
