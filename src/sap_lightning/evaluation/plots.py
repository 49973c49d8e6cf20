"""PNG figures of the evaluation: FROC curves and box plots.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch, so
importing this module never changes a notebook's backend) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sap_lightning.core.io import atomic_path

Curve = tuple[Sequence[float], Sequence[float]]
"""(mean FP per exam, mean sensitivity), one value per threshold."""


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def plot_froc(
    panels: Sequence[tuple[str, Mapping[str, Curve], float]],
    path: str | os.PathLike,
) -> Path:
    """One panel per (title, {arm: curve}, max FP per exam); curves start at the origin."""
    figure = Figure(figsize=(5.5 * len(panels), 4.5))
    for index, (title, curves, max_fp) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for name, (fp, sensitivity) in curves.items():
            fp, sensitivity = np.asarray(fp, float), np.asarray(sensitivity, float)
            keep = ~(np.isnan(fp) | np.isnan(sensitivity))
            order = np.lexsort((sensitivity[keep], fp[keep]))
            axes.plot(
                np.concatenate([[0.0], fp[keep][order]]),
                np.concatenate([[0.0], sensitivity[keep][order]]),
                marker=".",
                label=name,
            )
        axes.set_xlim(0, max_fp)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("mean false positives per exam")
        axes.set_ylabel("mean sensitivity")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    return _save(figure, path)


def plot_boxes(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    columns: int = 4,
) -> Path:
    """Box plots: one panel per metric, one box per arm (NaN values left out)."""
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(3.6 * min(columns, len(panels)), 3.4 * rows))
    for index, (metric, arms) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(rows, min(columns, len(panels)), index)
        values = [np.asarray(v, float)[~np.isnan(np.asarray(v, float))] for v in arms.values()]
        axes.boxplot(values, showfliers=True)
        axes.set_xticks(range(1, len(arms) + 1), list(arms.keys()))
        axes.set_title(metric, fontsize=10)
        axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return _save(figure, path)
