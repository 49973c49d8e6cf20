"""Repeats of a study (pipeline/study.py ``repeat_config``, evaluation/repeats.py): seeds and
folders per repeat, and the pooled report's effects against the endpoint functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap_lightning.config import StudyConfig
from sap_lightning.evaluation.endpoints import paired_effect, pooled_effect
from sap_lightning.evaluation.repeats import RepeatResult, write_pooled_report
from sap_lightning.pipeline.study import repeat_config


def test_repeat_zero_is_the_study_itself_and_the_others_get_their_own_seed_and_folders() -> None:
    study = StudyConfig(seed=3, data_dir="data/x", runs_dir="runs/x/", report_dir="reports/x")
    assert repeat_config(study, 0) == StudyConfig(
        seed=3, data_dir="data/x", runs_dir="runs/x/", report_dir="reports/x", repeats=1
    )
    second = repeat_config(study, 2)
    assert (second.seed, second.data_dir, second.runs_dir, second.report_dir) == (
        5,
        "data/x_repeat2",
        "runs/x_repeat2",
        "reports/x_repeat2",
    )
    assert second.repeats == 1


def _evaluation(folder: Path, f2: list[float]) -> Path:
    """A minimal ``sap evaluate`` folder: what the pooled report reads."""
    folder.mkdir(parents=True)
    cases = pd.DataFrame({"case_id": [f"p{i}" for i in range(len(f2))], "f2": f2, "n_gt": 1})
    cases.to_csv(folder / "cases.csv", index=False)
    pd.DataFrame(columns=["case_id", "lesion_id", "detected"]).to_csv(
        folder / "lesions.csv", index=False
    )
    pd.DataFrame(columns=["case_id", "threshold"]).to_csv(folder / "froc.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"settings": {}}))
    return folder


def test_the_pooled_report_pools_repeats_and_states_each(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    study = StudyConfig(name="t", arms=["scratch", "sap"], n_resamples=200, report_dir="r")
    results, differences = [], []
    for repeat in range(3):
        scratch = rng.uniform(0.2, 0.6, 12)
        sap = np.clip(scratch + rng.normal(0.1, 0.05, 12), 0, 1)
        differences.append(sap - scratch)
        root = tmp_path / f"repeat{repeat}"
        evaluations = {
            "scratch": _evaluation(root / "scratch", scratch.tolist()),
            "sap": _evaluation(root / "sap", sap.tolist()),
        }
        report = tmp_path / "reports" / f"r{repeat}" / "report.md"
        config = repeat_config(study, repeat)
        results.append(RepeatResult(repeat, config, evaluations, [], report))
    path = write_pooled_report(study, results, tmp_path / "reports" / "pooled")
    text = path.read_text()
    pooled = pooled_effect(differences, 200, seed=study.seed)
    assert f"Hodges-Lehmann {pooled.format()}" in text
    assert "36 pairs" in text and "The interval excludes 0" in text
    for repeat, d in enumerate(differences):  # with the seed the repeat's own report used
        effect = paired_effect(d, 200, seed=study.seed + repeat)
        row = next(line for line in text.splitlines() if line.startswith(f"| {repeat} |"))
        assert effect.format() in row
    payload = json.loads((path.parent / "pooled.json").read_text())
    assert payload["pairs"][0]["pooled"]["estimate"] == pytest.approx(pooled.estimate)


def test_the_pooled_report_opens_with_the_headline_and_corrects_secondary_pairs(
    tmp_path: Path,
) -> None:
    """The protocol's headline is the first line under the title; with two secondary pairs
    (SSL and SAP against each other and SSL against scratch) each per-repeat p-value is shown
    raw and times 2, capped at 1, the raw one checked against SciPy's Pratt Wilcoxon."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(1)
    study = StudyConfig(name="t", arms=["scratch", "ssl", "sap"], n_resamples=100, report_dir="r")
    scores = {arm: rng.uniform(0.1, 0.9, 15) for arm in study.arms}
    root = tmp_path / "repeat0"
    evaluations = {arm: _evaluation(root / arm, f2.tolist()) for arm, f2 in scores.items()}
    report = tmp_path / "reports" / "r0" / "report.md"
    results = [RepeatResult(0, repeat_config(study, 0), evaluations, [], report)]
    text = write_pooled_report(study, results, tmp_path / "reports" / "pooled").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[1].startswith("**Primary endpoint pooled over 1 repeats: SAP minus scratch")
    row = next(line for line in lines if line.startswith("| 0 |"))
    cells = row.strip("|").split("|")[1:]
    header = next(line for line in lines if line.startswith("| repeat |"))
    names = [cell.strip() for cell in header.strip("|").split("|")[1:]]
    for name, cell in zip(names, cells, strict=True):
        arm, baseline = name.split(" minus ")
        p = wilcoxon(scores[arm] - scores[baseline], zero_method="pratt").pvalue
        assert f"p = {p:.3g}" in cell
        if (arm, baseline) == ("sap", "scratch"):
            assert "Bonferroni" not in cell
        else:
            assert f"Bonferroni p = {min(1.0, 2 * p):.3g}" in cell
