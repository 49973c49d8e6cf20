"""The study verdict says whether the Bonferroni-corrected test supports a higher median."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sap_lightning.evaluation.report import Comparison, EvaluationRun, table_rows
from sap_lightning.evaluation.statistics import Summary
from sap_lightning.evaluation.study_report import PRIMARY_ROW, VERDICT_ROWS, verdict


def _comparison(sap_f2: float, scratch_f2: float, p_adjusted: float) -> Comparison:
    cells = {
        row: {name: Summary(0.5, 0.4, 0.6, 0.45, 0.55, 14) for name in ("scratch", "sap")}
        for row in VERDICT_ROWS
    }
    cells[PRIMARY_ROW] = {
        "scratch": Summary(scratch_f2, 0.0, 0.1, 0.0, 0.1, 14),
        "sap": Summary(sap_f2, 0.0, 0.2, 0.0, 0.2, 14),
    }
    pvalues = {PRIMARY_ROW: {"scratch vs sap": (p_adjusted / 3, p_adjusted, 14)}}
    return Comparison(["scratch", "sap"], table_rows("_large", 1.0), cells, pvalues, [])


@pytest.mark.parametrize(
    ("sap", "scratch", "p_adjusted", "expected"),
    [
        (0.052, 0.023, 0.0152, "SAP beat the scratch baseline"),
        (0.039, 0.032, 0.0655, "SAP beat the scratch baseline"),
        (0.010, 0.032, 0.0100, "SAP did not beat the scratch baseline"),
    ],
)
def test_verdict_states_whether_the_corrected_test_supports_it(
    sap, scratch, p_adjusted, expected
) -> None:
    text = verdict(_comparison(sap, scratch, p_adjusted)).splitlines()[0]
    assert expected in text
    supported = p_adjusted < 0.05
    assert ("The difference is significant" in text) is supported
    assert ("The difference is not significant" in text) is not supported


def _run(name: str, f2: list[float]) -> EvaluationRun:
    cases = pd.DataFrame({"case_id": [f"p{i}" for i in range(len(f2))], "f2": f2})
    return EvaluationRun(name, None, {}, cases, pd.DataFrame(), pd.DataFrame())  # type: ignore[arg-type]


def test_a_non_significant_verdict_states_the_power_and_the_observed_effect() -> None:
    """Not significant: the verdict quotes the test's power for d_z = 0.8 at the corrected level
    (checked against the paired t-test's exact power) and the paired F2 differences'
    standardised mean, computed here with numpy."""
    sap = [0.3, 0.5, 0.1, 0.4, 0.2, 0.6, 0.3, 0.5, 0.1, 0.4, 0.2, 0.6, 0.3, 0.35]
    scratch = [0.2, 0.6, 0.0, 0.3, 0.3, 0.4, 0.2, 0.6, 0.1, 0.2, 0.3, 0.5, 0.3, 0.30]
    comparison = _comparison(0.35, 0.30, 0.9)
    comparison.pvalues[PRIMARY_ROW].update({"a vs b": (1, 1, 14), "c vs d": (1, 1, 14)})
    comparison.runs = [_run("scratch", scratch), _run("sap", sap)]
    text = verdict(comparison).splitlines()[0]
    differences = np.subtract(sap, scratch)
    expected = differences.mean() / differences.std(ddof=1)
    assert f"d_z = {expected:.2f}" in text
    power = float(text.split("with probability ")[1].split(" ")[0])
    # The paired t-test's exact power (noncentral t); the Wilcoxon test is a little weaker.
    critical, shift = stats.t.ppf(1 - 0.05 / 3 / 2, 13), 0.8 * np.sqrt(14)
    t_power = stats.nct.sf(critical, 13, shift) + stats.nct.cdf(-critical, 13, shift)
    assert t_power - 0.08 < power <= t_power + 0.02
    assert "probability" not in verdict(_comparison(0.052, 0.023, 0.0152)).splitlines()[0]
