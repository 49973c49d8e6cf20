"""Shared pytest setup: quiet, offline, deterministic and CPU-only."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sap_lightning.core.threads import usable_cpus
from tests.tiny import TINY_NETWORK

# Keep every run offline and free of secrets: W&B never reaches a server from the tests.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("PYTHONHASHSEED", "0")
# Caches and splits go next to each test's dataset, whatever the developer's shell exports;
# remembered dataset checks go to a folder of this test session, not the user's cache.
os.environ.pop("SAP_PREPROCESSED", None)
os.environ["SAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="sap-test-cache-")
# The suite's own processes compete with each other by design; letting every in-process
# ``sap`` call sample the load would drop the whole pytest process to one thread after one busy
# moment. Pin torch to the CPUs the suite may use (tests of the sampling clear this variable).
# Under pytest-xdist (``make test`` runs two workers) the workers share the CPUs.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("SAP_NUM_THREADS", str(max(1, usable_cpus() // _WORKERS)))


TINY_STUDY_OVERRIDES = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=2",  # two epochs of one step: a checkpoint to resume from mid-run
    "trainer.limit_train_batches=1",
    TINY_NETWORK,
    "data.samples_per_volume=1",
    "data.queue_length=2",
    "validation.roi_size=[64,64,64]",
]


STUDY_ENV = {**os.environ, "SAP_NUM_THREADS": "1"}
"""One torch thread per run: every study of the suite sums in the same order, so their reports
can be compared byte for byte."""

TINY_STUDY_ARMS = ("scratch", "ssl", "mae", "sap")
"""Every built-in arm, so the one study of the suite covers each pretraining and transfer."""


@dataclass(frozen=True)
class TinyStudy:
    config: Any
    """The study's ``StudyConfig``."""
    report: Path
    logs: list[str]
    """stderr of the two ``sap study`` processes started at once."""


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    """The whole study on a tiny cohort with two-step trainings, every built-in arm, run once per
    session through the real command line: two ``sap study`` processes started at once on fresh
    folders (the second waits for the first's cohort and steps), each run on one torch thread
    (:data:`STUDY_ENV`). Used by the study tests and by the comparison notebook. (Steps running
    in worker processes are ``tests/unit/test_steps.py``'s.)"""
    from sap_lightning.config import StudyConfig, load_study_config, to_yaml

    root = tmp_path_factory.mktemp("study")
    config = StudyConfig(
        name="tiny",
        data_dir=str(root / "data"),
        runs_dir=str(root / "runs"),
        report_dir=str(root / "report"),
        healthy=3,
        patients=6,
        n_folds=3,
        phantom_shape=[64, 64, 128],
        phantom_spacing=[4.5, 4.5, 9.0],
        n_resamples=50,
        arms=list(TINY_STUDY_ARMS),
        overrides=list(TINY_STUDY_OVERRIDES),
        workers=1,
    )
    study_file = root / "study.yaml"
    study_file.write_text(to_yaml(config))
    command = [sys.executable, "-m", "sap_lightning", "study", "--config", str(study_file)]
    processes = [
        subprocess.Popen(
            command, env=STUDY_ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        for _ in range(2)
    ]
    logs = []
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr[-3000:]
        logs.append(stderr)
    return TinyStudy(load_study_config(study_file), root / "report" / "report.md", logs)
