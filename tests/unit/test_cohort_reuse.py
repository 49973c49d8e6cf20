"""A study reuses a cohort in its data_dir only when the same generator drew it with the same
settings (pipeline/reuse.py ``check_cohort``): anything else would be reported as its draw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sap_lightning.config import StudyConfig
from sap_lightning.core.errors import SapError
from sap_lightning.pipeline.reuse import check_cohort
from sap_lightning.synthetic import GENERATOR_VERSION


def _cohort(root: Path, **phantom) -> Path:
    """The two dataset.json files check_cohort reads, as the generator writes them."""
    study = StudyConfig()
    recorded = {"generator_version": GENERATOR_VERSION, "seed": study.seed,
                "mimics": float(study.mimics), **phantom}  # fmt: skip
    for task, count in (("lesion", study.patients), ("skeleton", study.healthy)):
        (root / task).mkdir(parents=True)
        spec = {"numTraining": count, "phantom": recorded}
        (root / task / "dataset.json").write_text(json.dumps(spec))
    return root


def test_the_current_generators_cohort_is_reused(tmp_path: Path) -> None:
    check_cohort(StudyConfig(), _cohort(tmp_path))


@pytest.mark.parametrize("version", [None, GENERATOR_VERSION - 1, GENERATOR_VERSION + 1])
def test_a_cohort_of_another_generator_version_is_refused(tmp_path: Path, version) -> None:
    root = _cohort(tmp_path, generator_version=version)
    expected = re.escape(f"generator version {version} (study: {GENERATOR_VERSION})")
    with pytest.raises(SapError, match=re.escape(str(root)) + ".*" + expected):
        check_cohort(StudyConfig(), root)
