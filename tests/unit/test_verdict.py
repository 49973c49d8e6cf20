"""The study verdict says whether the Bonferroni-corrected test supports a higher median."""

from __future__ import annotations

import pytest

from sap_lightning.evaluation.report import Cell, Comparison
from sap_lightning.pipeline.study import VERDICT_ROWS, verdict


def _comparison(sap_f2: float, scratch_f2: float, p_adjusted: float) -> Comparison:
    cells = {
        row: {name: Cell(0.5, 0.4, 0.6, 0.45, 0.55, 14) for name in ("scratch", "sap")}
        for row in VERDICT_ROWS
    }
    cells["F2 (detection score)"] = {
        "scratch": Cell(scratch_f2, 0.0, 0.1, 0.0, 0.1, 14),
        "sap": Cell(sap_f2, 0.0, 0.2, 0.0, 0.2, 14),
    }
    pvalues = {"F2 (detection score)": {"scratch vs sap": (p_adjusted / 3, p_adjusted, 14)}}
    return Comparison(["scratch", "sap"], [], cells, pvalues, [])


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
