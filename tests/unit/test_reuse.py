"""A study's check of a completed run's recorded settings (``pipeline/reuse.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap_lightning.config import load_config
from sap_lightning.core.errors import SapError
from sap_lightning.pipeline.reuse import check_reuse, run_settings
from sap_lightning.pipeline.steps import DONE_FILE
from tests.training import EXPERIMENTS

CONFIG = str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml")


def _completed_run(run_dir: Path, overrides: list[str], drop: str | None = None) -> Path:
    """A run folder whose recorded settings are those of ``overrides``, less the key ``drop``
    (as a run recorded before the library had that key)."""
    settings = run_settings(load_config(CONFIG, [*overrides, f"run_dir={run_dir}"]))
    if drop is not None:
        del settings[drop]
    run_dir.mkdir(parents=True)
    (run_dir / DONE_FILE).write_text(json.dumps({"settings": settings}))
    return run_dir


def test_a_run_recorded_with_the_same_settings_is_reused(tmp_path: Path) -> None:
    run_dir = _completed_run(tmp_path / "run", ["optim.lr=0.01"])
    check_reuse("fine-tune", CONFIG, [], ["optim.lr=0.01"], run_dir)


def test_a_changed_setting_is_refused_naming_it(tmp_path: Path) -> None:
    run_dir = _completed_run(tmp_path / "run", ["optim.lr=0.01"])
    with pytest.raises(SapError, match=r"optim\.lr: 0\.01 -> 0\.02"):
        check_reuse("fine-tune", CONFIG, [], ["optim.lr=0.02"], run_dir)


def test_a_key_added_since_the_run_is_no_change_at_its_default(tmp_path: Path) -> None:
    """The run predates ``loss.topk_percent``: at its default the study reuses the run; set to
    another value, it is a recipe the run was not trained with."""
    run_dir = _completed_run(tmp_path / "run", [], drop="loss.topk_percent")
    check_reuse("fine-tune", CONFIG, [], [], run_dir)
    with pytest.raises(SapError, match=r"loss\.topk_percent: '\(unset\)' -> 20\.0"):
        check_reuse("fine-tune", CONFIG, [], ["loss.topk_percent=20"], run_dir)


def test_a_key_the_study_no_longer_has_is_a_change(tmp_path: Path) -> None:
    run_dir = _completed_run(tmp_path / "run", [])
    recorded = json.loads((run_dir / DONE_FILE).read_text())
    recorded["settings"]["loss.retired_option"] = 3
    (run_dir / DONE_FILE).write_text(json.dumps(recorded))
    with pytest.raises(SapError, match=r"loss\.retired_option: 3 -> '\(unset\)'"):
        check_reuse("fine-tune", CONFIG, [], [], run_dir)
