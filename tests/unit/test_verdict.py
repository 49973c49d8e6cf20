"""The report's headline is the protocol's primary endpoint, computed from the arms' own rows."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sap_lightning.evaluation.endpoints import paired_effect
from sap_lightning.evaluation.report import EvaluationRun, compare_runs
from sap_lightning.evaluation.study_report import verdict


def _run(name: str, f2: list[float], n_gt: list[int] | None = None) -> EvaluationRun:
    n = len(f2)
    cases = pd.DataFrame(
        {
            "case_id": [f"p{i:02d}" for i in range(n)],
            "f2": f2,
            "n_gt": n_gt or [2] * n,
            "sensitivity": f2,
            "precision": f2,
            "n_fp": [1.0] * n,
            "patient_mean_dice": f2,
            "global_dice": f2,
            "sensitivity_1ml": f2,
            "n_fp_1ml": [0.0] * n,
            "pred_volume_ml": [1.0] * n,
            "gt_volume_ml": [1.1] * n,
        }
    )
    lesions = pd.DataFrame(
        {"case_id": ["p00"], "lesion_id": [1], "detected": [True], "dice": [0.5], "nsd": [0.5]}
    )
    summary = {"settings": {"min_volume_ml": 1.0, "large_suffix": "_1ml"}}
    return EvaluationRun(name, None, summary, cases, lesions, pd.DataFrame())  # type: ignore[arg-type]


SAP = [0.3, 0.5, 0.1, 0.4, 0.2, 0.6, 0.3, 0.5, 0.1, 0.4, 0.2, 0.6, 0.3, 0.35]
SCRATCH = [0.2, 0.6, 0.0, 0.3, 0.3, 0.4, 0.2, 0.6, 0.1, 0.2, 0.3, 0.5, 0.3, 0.30]


def test_the_headline_is_the_hodges_lehmann_difference_with_its_test() -> None:
    comparison = compare_runs([_run("scratch", SCRATCH), _run("sap", SAP)], n_resamples=200)
    text = verdict(comparison, n_resamples=200).splitlines()[0]
    differences = np.subtract(SAP, SCRATCH)
    walsh = [(a + b) / 2 for a, b in itertools.combinations_with_replacement(differences, 2)]
    assert f"Hodges-Lehmann {np.median(walsh):+.3f} [" in text
    p = stats.wilcoxon(differences, zero_method="pratt").pvalue
    assert f"Wilcoxon p = {p:.3g}" in text
    assert "14 paired patients" in text
    assert "SAP's F2 was higher than scratch's" in text
    assert ("not significant" in text) == bool(p >= 0.05)
    power = float(text.split("from the observed pairs: ")[1].split("*")[0].rstrip("."))
    assert 0.0 <= power <= 1.0


def test_lesion_free_patients_never_enter_the_primary_endpoint() -> None:
    """A patient without lesions would score F2 = 1 with no false positive: it is left out of
    the pairs (and of every patient row), reported only by its false positives."""
    with_free = [*SAP, 1.0], [*SCRATCH, 0.0], [2] * 14 + [0]
    runs = [_run("scratch", with_free[1], with_free[2]), _run("sap", with_free[0], with_free[2])]
    comparison = compare_runs(runs, n_resamples=200)
    assert "14 paired patients" in verdict(comparison, n_resamples=200)
    assert comparison.cells["f2"]["sap"].n == 14
    assert comparison.cells["n_fp_lesion_free"]["sap"].n == 1


@pytest.mark.parametrize(("shift", "words"), [(-0.2, "was lower than"), (0.0, "did not differ")])
def test_the_headline_names_the_direction(shift: float, words: str) -> None:
    sap = list(np.clip(np.add(SCRATCH, shift), 0, 1)) if shift else SCRATCH
    comparison = compare_runs([_run("scratch", SCRATCH), _run("sap", sap)], n_resamples=100)
    assert words in verdict(comparison, n_resamples=100).splitlines()[0]


def test_without_the_primary_pair_there_is_no_headline_effect() -> None:
    comparison = compare_runs([_run("scratch", SCRATCH), _run("ssl", SAP)], n_resamples=100)
    assert verdict(comparison).startswith("No primary endpoint")
    assert comparison.pvalues["f2"]["scratch vs ssl"][1] == pytest.approx(
        comparison.pvalues["f2"]["scratch vs ssl"][0]  # one secondary pair: factor 1
    )


def test_every_pair_gets_the_primary_estimator_and_the_secondary_ones_are_corrected() -> None:
    """Three arms: the primary pair first, then SSL minus scratch and SAP minus SSL, each with
    the Hodges-Lehmann estimate (median of the Walsh averages, computed here), SciPy's Pratt
    Wilcoxon p and, for the two secondary pairs, that p times 2 (capped at 1)."""
    ssl = [0.25, 0.55, 0.05, 0.35, 0.25, 0.5, 0.2, 0.55, 0.1, 0.3, 0.25, 0.55, 0.3, 0.3]
    arms = {"scratch": SCRATCH, "ssl": ssl, "sap": SAP}
    comparison = compare_runs([_run(n, f2) for n, f2 in arms.items()], n_resamples=200)
    text = verdict(comparison, n_resamples=200)
    rows = [line for line in text.splitlines() if " minus " in line and line.startswith("| ")]
    expected_order = [("sap", "scratch"), ("ssl", "scratch"), ("sap", "ssl")]
    assert [tuple(r.split("|")[1].split(" (")[0].strip().split(" minus ")) for r in rows] == (
        expected_order
    )
    for row, (arm, baseline) in zip(rows, expected_order, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        differences = np.subtract(arms[arm], arms[baseline])
        walsh = [(a + b) / 2 for a, b in itertools.combinations_with_replacement(differences, 2)]
        assert cells[1].startswith(f"{np.median(walsh):+.3f} [")
        low, high = (float(v) for v in cells[1].split("[")[1].rstrip("]").split(","))
        assert low < np.median(walsh) < high  # a 95% interval, not a point
        # the same interval the headline gives its pair (same estimator, seed and resamples)
        assert cells[1] == paired_effect(differences, 200, seed=0).format()
        p = stats.wilcoxon(differences, zero_method="pratt").pvalue
        assert cells[2] == f"{p:.3g}"
        assert cells[3] == (
            "-" if baseline == "scratch" and arm == "sap" else f"{min(1, 2 * p):.3g}"
        )
        assert cells[4] == "14"


@pytest.mark.parametrize(
    "arms",
    [["scratch", "ssl", "sap"], ["sap", "ssl", "scratch"], ["ssl", "sap", "scratch", "mae"]],
)
def test_pairs_read_as_the_protocol_names_them_whatever_the_arms_order(arms) -> None:
    """docs/protocol.md: SAP minus scratch (primary), SSL minus scratch, SAP minus SSL, and MAE
    against scratch and SAP (and SSL): the listed order of the arms changes nothing."""
    from sap_lightning.evaluation.report import arm_pairs

    expected = [("sap", "scratch"), ("ssl", "scratch"), ("sap", "ssl")]
    if "mae" in arms:
        expected = [
            ("sap", "scratch"), ("ssl", "scratch"), ("mae", "scratch"), ("sap", "ssl"),
            ("mae", "ssl"), ("mae", "sap"),
        ]  # fmt: skip
    assert arm_pairs(arms) == expected
