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
from sap_lightning.synthetic import GENERATOR_VERSION, resolve_grid


def _cohort(root: Path, **phantom) -> Path:
    """The two dataset.json files check_cohort reads, as the generator writes them."""
    study = StudyConfig()
    shape, spacing = resolve_grid()
    recorded = {"generator_version": GENERATOR_VERSION, "seed": study.seed,
                "mimics": float(study.mimics), "shape": list(shape), "spacing": list(spacing),
                **phantom}  # fmt: skip
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
    expected = re.escape(
        f"generator version {version} (study: {GENERATOR_VERSION})"
        if version is not None
        else f"no generator version recorded (an older sap_lightning wrote it; study: "
        f"{GENERATOR_VERSION})"
    )
    with pytest.raises(SapError, match=re.escape(str(root)) + ".*" + expected):
        check_cohort(StudyConfig(), root)


def test_runs_trained_on_another_cohort_are_refused(tmp_path: Path) -> None:
    """The first study on a runs_dir records its cohort there; a regenerated cohort (another
    draw: other lesion volumes) on the same runs_dir is refused, the same one passes."""
    from sap_lightning.pipeline.reuse import COHORT_RECORD, check_runs_cohort

    study = StudyConfig(runs_dir=str(tmp_path / "runs"))
    root = _cohort(tmp_path / "data", lesion_volumes_ml={"patient_000": [0.5, 1.2]})
    check_runs_cohort(study, root / "lesion")
    assert json.loads((tmp_path / "runs" / COHORT_RECORD).read_text())["lesion_volumes_ml"] == {
        "patient_000": [0.5, 1.2]
    }
    check_runs_cohort(study, root / "lesion")  # the same cohort again
    other = _cohort(tmp_path / "redrawn", lesion_volumes_ml={"patient_000": [0.7]})
    with pytest.raises(
        SapError, match=r"runs trained on another synthetic cohort.*lesion_volumes_ml"
    ):
        check_runs_cohort(study, other / "lesion")


def test_a_users_dataset_is_not_recorded(tmp_path: Path) -> None:
    from sap_lightning.pipeline.reuse import COHORT_RECORD, check_runs_cohort

    (tmp_path / "lesion").mkdir()
    (tmp_path / "lesion" / "dataset.json").write_text(json.dumps({"numTraining": 3}))
    check_runs_cohort(StudyConfig(runs_dir=str(tmp_path / "runs")), tmp_path / "lesion")
    assert not (tmp_path / "runs" / COHORT_RECORD).exists()


def test_ensure_reuses_this_generators_cohort_and_redraws_an_older_one(tmp_path: Path) -> None:
    """A cohort is reused (files untouched) only when its dataset.json records this generator
    and the same settings; one an older generator wrote is drawn again."""
    from sap_lightning.synthetic import SIZES, cohort_differences, ensure_phantom_cohort

    shape, spacing = SIZES["tiny"]
    settings = {"seed": 3, "shape": shape, "spacing": spacing}
    assert cohort_differences(tmp_path, 1, 1, **settings) is None
    assert ensure_phantom_cohort(tmp_path, 1, 1, **settings) is False  # generated
    spec_path = tmp_path / "lesion" / "dataset.json"
    stamp = spec_path.stat().st_mtime_ns
    assert cohort_differences(tmp_path, 1, 1, **settings) == []
    assert ensure_phantom_cohort(tmp_path, 1, 1, **settings) is True
    assert spec_path.stat().st_mtime_ns == stamp
    assert cohort_differences(tmp_path, 1, 2, **settings) == [("patients", 1, 2)]
    spec = json.loads(spec_path.read_text())
    del spec["phantom"]["generator_version"]
    spec_path.write_text(json.dumps(spec))
    assert cohort_differences(tmp_path, 1, 1, **settings) == [
        ("generator version", None, GENERATOR_VERSION)
    ]
    assert ensure_phantom_cohort(tmp_path, 1, 1, **settings) is False
    assert json.loads(spec_path.read_text())["phantom"]["generator_version"] == GENERATOR_VERSION
