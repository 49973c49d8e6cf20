"""Shared pytest setup: quiet, offline, deterministic and CPU-only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sap_lightning.core.threads import usable_cpus

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
os.environ.setdefault("SAP_NUM_THREADS", str(usable_cpus()))


import pytest

TINY_STUDY_OVERRIDES = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "model.kwargs.features=[2,4,4,4,4,2]",
    "data.samples_per_volume=1",
    "data.queue_length=2",
    "validation.roi_size=[64,64,64]",
]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory):
    """The whole study (``sap study``) on a tiny cohort with one-step trainings, run once per
    session: used by the study test and by the comparison notebook."""
    from sap_lightning.config import StudyConfig
    from sap_lightning.pipeline.study import run_study

    root = tmp_path_factory.mktemp("study")
    experiments = Path(__file__).resolve().parents[1] / "experiments" / "cpu"
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
        pretrain_config=str(experiments / "pretrain.yaml"),
        ssl_config=str(experiments / "ssl.yaml"),
        finetune_configs={
            arm: str(experiments / f"finetune_{arm}.yaml") for arm in ("scratch", "ssl", "sap")
        },
        overrides=list(TINY_STUDY_OVERRIDES),
    )
    return config, run_study(config)
