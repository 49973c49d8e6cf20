"""Binarisation threshold: chosen on the tuning fold, stored with the run, reused unchanged.

The criterion is the paper's: the threshold of a grid that maximises the median over patients
of the per-patient F2. Which patients decide, and which thresholds are eligible, is chosen by
the caller (``evaluation.predictions.tune_on_predictions``: patients with lesions, thresholds
with a plausible predicted volume). Ties go to the **lowest** threshold: it detects at least as
many lesions, which is what F2's weighting of sensitivity over precision asks for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.core.errors import SapError
from sap_lightning.core.io import write_json
from sap_lightning.core.run_layout import load_threshold

CRITERION = "median patient F2 (any-overlap detection), ties -> lowest threshold"


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and the evidence for it (written as JSON next to the run)."""

    threshold: float
    median_f2: float
    grid: list[float]
    median_f2_per_threshold: list[float | None]
    n_cases: int
    cases: list[str] = field(default_factory=list)
    criterion: str = CRITERION
    settings: dict[str, Any] = field(default_factory=dict)


def tune_threshold(
    thresholds: Sequence[float],
    f2: np.ndarray,
    cases: Sequence[str] = (),
    settings: dict[str, Any] | None = None,
) -> ThresholdChoice:
    """Pick the threshold maximising the median patient F2.

    ``f2`` is (cases, thresholds) with NaN where a patient's F2 is undefined.
    """
    grid = np.asarray(thresholds, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if f2.ndim != 2 or f2.shape[1] != len(grid) or len(grid) == 0:
        raise ValueError(f"f2 must be (cases, {len(grid)} thresholds), got shape {f2.shape}")
    order = np.argsort(grid, kind="stable")
    grid, f2 = grid[order], f2[:, order]
    medians = np.array(
        [np.median(col[~np.isnan(col)]) if np.any(~np.isnan(col)) else np.nan for col in f2.T]
    )
    if np.all(np.isnan(medians)):
        raise SapError(
            "cannot tune the threshold: no case has a defined F2 (no lesions and no predictions)"
        )
    best = int(np.nanargmax(medians))  # the first maximum is the lowest threshold
    return ThresholdChoice(
        threshold=float(grid[best]),
        median_f2=float(medians[best]),
        grid=[float(t) for t in grid],
        median_f2_per_threshold=[None if math.isnan(m) else float(m) for m in medians],
        n_cases=int(f2.shape[0]),
        cases=list(cases),
        settings=dict(settings or {}),
    )


def save_threshold(path: str | os.PathLike, choice: ThresholdChoice) -> Path:
    """Write the choice as JSON (atomically)."""
    return write_json(path, asdict(choice))


__all__ = ["CRITERION", "ThresholdChoice", "load_threshold", "save_threshold", "tune_threshold"]
