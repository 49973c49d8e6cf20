"""Compare evaluated runs (``sap compare``): the paper's Table 1 with CIs, p-values and figures.

Each arm is a folder written by ``sap evaluate``; the analysis is docs/protocol.md's. Patient
rows: median (or mean, where the paper reports means) over the patients **with a lesion**
(lesion-free patients are reported apart, by their false positives) with a 95% bootstrap CI
over patients, and a paired Wilcoxon signed-rank test (Pratt) between arms. Lesion rows (Dice
and NSD of detected lesions): median over lesions with a CI over patients; arms are compared on
the lesions both detected, resampling patients. Cohort rows (ICC of total volume, FROC AUC):
the estimate with a bootstrap CI over patients and no test. The primary pair (``sap`` against
``scratch``) is not corrected; the other pairs are Bonferroni-corrected over their number.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sap_lightning.core.errors import SapError
from sap_lightning.core.io import read_json, write_json, write_text
from sap_lightning.core.protocol import BOOTSTRAP_RESAMPLES, FROC_MAX_FP_ALL, FROC_MAX_FP_LARGE
from sap_lightning.core.run_layout import EVALUATION_DIR
from sap_lightning.evaluation.endpoints import clustered_ci, clustered_difference, wilcoxon_pratt
from sap_lightning.evaluation.plots import plot_boxes, plot_froc
from sap_lightning.evaluation.predictions import (
    CASES_CSV,
    FALSE_POSITIVES_CSV,
    FROC_CSV,
    LESIONS_CSV,
    SUMMARY_JSON,
)
from sap_lightning.evaluation.statistics import Summary, bonferroni, bootstrap_ci
from sap_lightning.metrics.agreement import icc_2_1
from sap_lightning.metrics.froc import froc_auc, froc_curve
from sap_lightning.metrics.functional import detection_rates

REPORT_MD = "report.md"
COMPARISON_JSON = "comparison.json"
FROC_PNG = "froc.png"
BOXPLOTS_PNG = "boxplots.png"


@dataclass(frozen=True)
class EvaluationRun:
    """One arm: the files ``sap evaluate`` wrote."""

    name: str
    path: Path
    summary: dict[str, Any]
    cases: pd.DataFrame
    lesions: pd.DataFrame
    froc: pd.DataFrame
    false_positives: pd.DataFrame | None = None
    """``false_positives.csv`` of ``sap evaluate`` (a run's own validation has none)."""

    @property
    def large_suffix(self) -> str:
        return self.summary["settings"]["large_suffix"]

    @property
    def has_froc(self) -> bool:
        return len(self.froc) > 0


def load_evaluation(path: str | os.PathLike, name: str | None = None) -> EvaluationRun:
    """Read an evaluation folder (or a fine-tuning run folder, through its ``evaluation/``),
    with an error naming the folder and the missing file."""
    path = Path(path)
    if not (path / SUMMARY_JSON).is_file() and (path / EVALUATION_DIR / SUMMARY_JSON).is_file():
        name = name or path.name
        path = path / EVALUATION_DIR
    files = {n: path / n for n in (SUMMARY_JSON, CASES_CSV, LESIONS_CSV, FROC_CSV)}
    for file in files.values():
        if not file.is_file():
            raise SapError(f"{path}: not a complete evaluation folder ({file.name} is missing)")
    try:
        summary = read_json(files[SUMMARY_JSON])
        tables = {
            n: pd.read_csv(files[n], dtype={"case_id": str})
            for n in (CASES_CSV, LESIONS_CSV, FROC_CSV)
        }
    except (OSError, ValueError) as err:
        raise SapError(f"{path}: unreadable evaluation file ({err})") from err
    located = None
    if (path / FALSE_POSITIVES_CSV).is_file():
        located = pd.read_csv(path / FALSE_POSITIVES_CSV, dtype={"case_id": str}, na_filter=False)
    return EvaluationRun(
        name or path.name,
        path,
        summary,
        tables[CASES_CSV],
        tables[LESIONS_CSV],
        tables[FROC_CSV],
        located,
    )


# ------------------------------------------------------------------------------ table rows


def _froc_counts(run: EvaluationRun, large: bool) -> np.ndarray:
    """(cases, thresholds, 4) counts: n_gt, n_detected, n_pred, n_pred_matched."""
    s = "_large" if large else ""
    columns = [f"n_gt{s}", f"n_detected{s}", f"n_pred{s}", f"n_pred_matched{s}"]
    frame = run.froc.sort_values(["case_id", "threshold"])
    n_thresholds = frame["threshold"].nunique()
    return frame[columns].to_numpy(np.float64).reshape(-1, n_thresholds, len(columns))


def _froc_auc_of(counts: np.ndarray, max_fp: float) -> float:
    sensitivity, _, _ = detection_rates(*np.moveaxis(counts, -1, 0))
    fp = counts[..., 2] - counts[..., 3]
    return froc_auc(*froc_curve(sensitivity, fp), max_fp)


_REDUCERS: dict[str, Callable[..., Any]] = {"median": np.median, "mean": np.mean}


@dataclass(frozen=True)
class MetricRow:
    """One row of the table: how to get an arm's sample and what to report of it.

    Patient and lesion rows report the median or mean of their per-unit values (NaN = undefined
    for that unit, left out). Cohort rows report ``statistic`` of the per-patient sample (an
    array with one row per patient) and are bootstrapped over patients.
    """

    id: str
    """Stable key of the row (cells, p-values, JSON); ``label`` is for display only."""
    label: str
    unit: str  # "patient", "lesion", "cohort" or "lesion_free"
    sample: Callable[[EvaluationRun], np.ndarray]
    estimate: str  # "median" or "mean" for patient and lesion rows; a name for cohort rows
    column: str | None = None  # per-case column: pairs patients for the Wilcoxon test
    statistic: Callable[[np.ndarray], float] | None = None  # cohort rows only
    needs_froc: bool = False  # cohort rows defined only for runs with probability maps

    @property
    def reducer(self) -> Callable[..., Any]:
        return _REDUCERS[self.estimate]

    @property
    def display(self) -> str:
        return self.label if self.unit == "cohort" else f"{self.label} ({self.estimate})"


def table_rows(suffix: str, min_volume_ml: float) -> list[MetricRow]:
    """The rows of the paper's reported results, in its order."""

    def patient(label: str, column: str, estimate: str = "median") -> MetricRow:
        return MetricRow(
            column,
            label,
            "patient",
            lambda run: column_of(with_lesions(run.cases), column),
            estimate,
            column,
        )

    def lesion(label: str, column: str) -> MetricRow:
        def detected(run: EvaluationRun) -> np.ndarray:
            rows = run.lesions["detected"].astype(bool)
            return run.lesions.loc[rows, column].to_numpy(np.float64)

        return MetricRow(column, label, "lesion", detected, "median", column)

    def froc_row(label: str, large: bool, max_fp: float) -> MetricRow:
        return MetricRow(
            "froc_auc_large" if large else "froc_auc",
            label,
            "cohort",
            lambda run: _froc_counts(run, large),
            "AUC",
            statistic=lambda counts: _froc_auc_of(counts, max_fp),
            needs_froc=True,
        )

    large = f">= {min_volume_ml:g} mL"
    return [
        patient("lesion sensitivity", "sensitivity"),
        patient("precision", "precision"),
        patient("FP per exam", "n_fp"),
        patient("FP per exam inside bone", "n_fp_in_bone"),
        patient("FP per exam outside bone", "n_fp_outside_bone"),
        patient("F2 (detection score)", "f2"),
        lesion("Dice, detected lesions", "dice"),
        lesion("NSD, detected lesions", "nsd"),
        patient("per-patient mean Dice", "patient_mean_dice"),
        patient("global Dice", "global_dice"),
        MetricRow(
            "volume_icc",
            "ICC(2,1) total volume",
            "cohort",
            lambda run: run.cases[["pred_volume_ml", "gt_volume_ml"]].to_numpy(np.float64),
            "ICC(2,1)",
            statistic=icc_2_1,
        ),
        froc_row(f"FROC AUC to {FROC_MAX_FP_ALL:g} FP/exam", False, FROC_MAX_FP_ALL),
        froc_row(f"FROC AUC to {FROC_MAX_FP_LARGE:g} FP/exam, {large}", True, FROC_MAX_FP_LARGE),
        patient(f"{large}: sensitivity", f"sensitivity{suffix}", "mean"),
        patient(f"{large}: FP per exam", f"n_fp{suffix}", "mean"),
        MetricRow(
            "n_fp_lesion_free",
            "FP per exam, patients without lesions",
            "lesion_free",
            lambda run: lesion_free(run.cases)["n_fp"].to_numpy(np.float64),
            "median",
            "n_fp",
        ),
    ]


def column_of(cases: pd.DataFrame, column: str) -> np.ndarray:
    """A per-case column as floats; NaN (not assessed) where the evaluation has no such column
    (a run's own validation does not locate its false positives)."""
    if column not in cases:
        return np.full(len(cases), np.nan)
    return cases[column].to_numpy(np.float64)


def with_lesions(cases: pd.DataFrame) -> pd.DataFrame:
    """The patients F2 and every patient row is about: those with a reference lesion."""
    return cases[cases["n_gt"] > 0]


def lesion_free(cases: pd.DataFrame) -> pd.DataFrame:
    """Patients without a reference lesion: only their false positives mean something."""
    return cases[cases["n_gt"] == 0]


# ------------------------------------------------------------------------------ comparison


PRIMARY_PAIR = ("sap", "scratch")
"""(arm, baseline) of the primary endpoint (docs/protocol.md): its p-values are not corrected."""
BASELINE_ORDER = ("scratch", "ssl", "sap", "mae")
"""An effect is the later arm of this order minus the earlier, as docs/protocol.md names the
pairs (SAP minus scratch, SSL minus scratch, SAP minus SSL, MAE minus scratch and SAP); arms
outside it come after, in the study's order."""


def arm_pairs(arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, baseline) of every pair of ``arms``, the primary pair first, whatever the order
    the arms are listed in (:data:`BASELINE_ORDER`)."""
    rank = {name: i for i, name in enumerate(BASELINE_ORDER)}
    ordered = sorted(arms, key=lambda a: (rank.get(a, len(rank)), list(arms).index(a)))
    pairs = [(later, earlier) for earlier, later in itertools.combinations(ordered, 2)]
    return sorted(pairs, key=lambda pair: pair != PRIMARY_PAIR)


@dataclass
class Comparison:
    names: list[str]
    rows: list[MetricRow]
    cells: dict[str, dict[str, Summary]]  # row id -> arm -> cell
    pvalues: dict[str, dict[str, tuple[float, float, int]]]  # row -> "a vs b" -> (p, p_adj, n)
    runs: list[EvaluationRun]
    primary: tuple[str, str] | None = None
    """The primary pair (arm, baseline) when both arms are compared."""
    n_secondary: int = 0
    """The number of other pairs, the Bonferroni factor of their p-values."""


def _cell(row: MetricRow, run: EvaluationRun, n_resamples: int, seed: int) -> Summary:
    if row.needs_froc and not run.has_froc:
        return Summary.undefined()
    sample = row.sample(run)
    if row.unit == "cohort":
        assert row.statistic is not None
        low, high = bootstrap_ci(sample, row.statistic, n_resamples, seed=seed)
        return Summary(row.statistic(sample), low, high, math.nan, math.nan, len(sample))
    values = sample[~np.isnan(sample)]
    if values.size == 0:
        return Summary.undefined()
    if row.unit == "lesion" and row.column is not None:  # lesions of a patient resampled together
        found = run.lesions[run.lesions["detected"].astype(bool)]
        low, high = clustered_ci(found[row.column], found["case_id"], n_resamples, seed=seed)
    else:
        low, high = bootstrap_ci(values, row.reducer, n_resamples, seed=seed, vectorized=True)
    q1, q3 = np.percentile(values, [25, 75])
    return Summary(float(row.reducer(values)), low, high, float(q1), float(q3), int(values.size))


def paired_patients(a: EvaluationRun, b: EvaluationRun, column: str) -> pd.DataFrame:
    """``column`` of the patients with a lesion that both arms evaluated, side by side
    (``<column>_a``, ``<column>_b``) with ``case_id``."""
    return with_lesions(a.cases)[["case_id", column]].merge(
        with_lesions(b.cases)[["case_id", column]], on="case_id", suffixes=("_a", "_b")
    )


def paired_lesions(a: EvaluationRun, b: EvaluationRun, column: str) -> pd.DataFrame:
    """``column`` of the reference lesions both arms detected, side by side, with ``case_id``."""
    found = [run.lesions[run.lesions["detected"].astype(bool)] for run in (a, b)]
    keys = ["case_id", "lesion_id"]
    return found[0][[*keys, column]].merge(
        found[1][[*keys, column]], on=keys, suffixes=("_a", "_b")
    )


def _pvalue(
    row: MetricRow, a: EvaluationRun, b: EvaluationRun, n_resamples: int, seed: int
) -> tuple[float, int]:
    if row.unit == "lesion" and row.column is not None:
        both = paired_lesions(a, b, row.column)
        differences = (both[f"{row.column}_a"] - both[f"{row.column}_b"]).to_numpy(np.float64)
        effect = clustered_difference(differences, both["case_id"], n_resamples, seed=seed)
        return effect.p, effect.n
    if row.unit == "patient" and row.column is not None:
        if row.column not in a.cases or row.column not in b.cases:
            return math.nan, 0
        both = paired_patients(a, b, row.column)
        differences = (both[f"{row.column}_a"] - both[f"{row.column}_b"]).to_numpy(np.float64)
        differences = differences[~np.isnan(differences)]
        return (wilcoxon_pratt(differences) if differences.size else math.nan), differences.size
    return math.nan, 0


def compare_runs(
    runs: Sequence[EvaluationRun], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Comparison:
    """Table cells for every arm and Bonferroni-corrected p-values for every arm pair."""
    if not runs:
        raise SapError("nothing to compare: give at least one evaluation folder")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise SapError(f"arm names must be unique, got {names} (use --names)")
    volumes = {run.summary["settings"]["min_volume_ml"] for run in runs}
    if len(volumes) != 1:
        raise SapError(f"the runs use different min_volume_ml settings: {sorted(volumes)}")
    rows = table_rows(runs[0].large_suffix, volumes.pop())
    if not any(len(lesion_free(run.cases)) for run in runs):
        rows = [row for row in rows if row.unit != "lesion_free"]
    rows = [  # rows no arm's evaluation has a column for (e.g. runs' own validations)
        row
        for row in rows
        if row.column is None
        or row.unit == "lesion"
        or any(row.column in run.cases for run in runs)
    ]
    cells = {row.id: {run.name: _cell(row, run, n_resamples, seed) for run in runs} for row in rows}
    pairs = list(itertools.combinations(runs, 2))
    primary = PRIMARY_PAIR if set(PRIMARY_PAIR) <= set(names) else None
    is_primary = [primary is not None and {a.name, b.name} == set(primary) for a, b in pairs]
    n_secondary = len(pairs) - sum(is_primary)
    pvalues: dict[str, dict[str, tuple[float, float, int]]] = {}
    for row in rows:
        raw = [_pvalue(row, a, b, n_resamples, seed) for a, b in pairs]
        pvalues[row.id] = {
            f"{a.name} vs {b.name}": (
                p,
                p if first else float(bonferroni([p], n_comparisons=max(1, n_secondary))[0]),
                n,
            )
            for (a, b), (p, n), first in zip(pairs, raw, is_primary)
        }
    return Comparison(names, rows, cells, pvalues, list(runs), primary, n_secondary)


# ------------------------------------------------------------------------------ writing


TEST_NAMES = {
    "patient": "Wilcoxon (paired, Pratt)",
    "lesion": "lesions both found, patients resampled",
    "lesion_free": "-",
}


TISSUES_SHOWN = 12
"""Tissues listed in the false-positive table (the most frequent over all arms)."""


def _tissue_section(comparison: Comparison) -> list[str]:
    """False positives by the tissue they lie in, summed over each arm's patients: where the
    arms' mistakes are (a synthetic cohort's tissue map names every mimic)."""
    tables = {
        run.name: run.false_positives
        for run in comparison.runs
        if run.false_positives is not None and (run.false_positives["tissue"] != "").any()
    }
    if not tables:
        return []
    counts = pd.DataFrame(  # components of patients without a tissue map have no tissue
        {
            name: table.loc[table["tissue"] != "", "tissue"].value_counts()
            for name, table in tables.items()
        }
    ).fillna(0)
    counts = counts.loc[counts.sum(axis=1).sort_values(ascending=False).index[:TISSUES_SHOWN]]
    body = [[str(tissue), *(f"{int(v)}" for v in row)] for tissue, row in counts.iterrows()]
    return [
        "## False positives by tissue",
        f"Every false-positive component of the test patients with a tissue map, by the tissue "
        f"most of its voxels lie in (the {TISSUES_SHOWN} most frequent); the inside / outside "
        "bone rows of Table 1 count the same components per exam, placed by whether most of "
        "their voxels are bone (a component can lie in bone while its most frequent tissue is "
        "not).",
        "",
        _markdown_table(["tissue", *tables], body),
        "",
    ]


def _correction_note(comparison: Comparison) -> str:
    if comparison.primary is None:
        return f"Bonferroni-corrected over {comparison.n_secondary} arm pair(s)."
    arm, baseline = comparison.primary
    return (
        f"{arm} vs {baseline} is the primary comparison (docs/protocol.md), not corrected; the "
        f"other {comparison.n_secondary} pair(s) are Bonferroni-corrected over their number."
    )


def _format_p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def render_markdown(comparison: Comparison, n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    names = comparison.names
    runs = comparison.runs
    main = _markdown_table(
        ["metric", *names],
        [
            [
                row.display,
                *(comparison.cells[row.id][n].format() for n in names),
            ]
            for row in comparison.rows
        ],
    )
    iqr = _markdown_table(
        ["metric", *names],
        [
            [
                row.label,
                *(
                    f"{c.q1:.3f} - {c.q3:.3f} (n={c.n})" if not math.isnan(c.q1) else "-"
                    for c in (comparison.cells[row.id][n] for n in names)
                ),
            ]
            for row in comparison.rows
            if row.unit != "cohort"
        ],
    )
    pair_names = list(next(iter(comparison.pvalues.values())).keys()) if comparison.pvalues else []
    tested = [row for row in comparison.rows if row.unit != "cohort"]
    pvalue_table = _markdown_table(
        ["metric", "test", *pair_names],
        [
            [
                row.label,
                TEST_NAMES[row.unit],
                *(
                    f"{_format_p(comparison.pvalues[row.id][pair][1])} "
                    f"(raw {_format_p(comparison.pvalues[row.id][pair][0])})"
                    for pair in pair_names
                ),
            ]
            for row in tested
        ],
    )
    arms = "\n".join(
        f"- **{run.name}**: `{run.path}`, {len(run.cases)} patients, operating point "
        f"{run.summary['operating_point']['source']}"
        + (
            f" (threshold {run.summary['operating_point']['threshold']:g})"
            if run.summary["operating_point"].get("threshold") is not None
            else ""
        )
        for run in runs
    )
    settings = runs[0].summary["settings"]
    parts = [
        "# Lesion-wise comparison",
        "",
        "## Arms",
        arms,
        "",
        "## Table 1",
        f"Median (or mean / cohort statistic, as named) with 95% percentile bootstrap CI "
        f"({n_resamples} resamples). Lesions: 3D connected components "
        f"(connectivity {settings['connectivity']}); detection: any voxel overlap, each side "
        f"counted on its own; NSD tolerance {settings['tolerance_mm']:g} mm (area-weighted).",
        "",
        main,
        "",
        "## Interquartile ranges",
        iqr,
        "",
        "## p-values",
        _correction_note(comparison) + " Raw p in brackets. Patient tests pair the patients "
        "with a lesion both arms evaluated; lesion tests the lesions both arms detected.",
        "",
        pvalue_table if pair_names else "(one arm: no tests)",
        "",
        *_tissue_section(comparison),
        "## Figures",
        f"![FROC curves]({FROC_PNG})",
        "",
        f"![Box plots]({BOXPLOTS_PNG})",
        "",
    ]
    return "\n".join(parts)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_comparison(
    comparison: Comparison, out_dir: str | os.PathLike, n_resamples: int = BOOTSTRAP_RESAMPLES
) -> list[Path]:
    """Write report.md, comparison.json, froc.png and boxplots.png.

    The report and comparison.json are removed first and written last, so after an interrupted
    rewrite a folder never pairs an old report with new figures: a report present is complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (REPORT_MD, COMPARISON_JSON):
        (out / stale).unlink(missing_ok=True)
    runs = comparison.runs
    froc_panels = []
    for key, title, max_fp in (
        ("all", "all lesions", FROC_MAX_FP_ALL),
        ("large", f">= {runs[0].summary['settings']['min_volume_ml']:g} mL", FROC_MAX_FP_LARGE),
    ):
        curves = {
            run.name: (run.summary["froc"][key]["mean_fp"], run.summary["froc"][key]["sensitivity"])
            for run in runs
            if key in run.summary.get("froc", {})
        }
        froc_panels.append((title, {n: _none_to_nan(c) for n, c in curves.items()}, max_fp))
    plot_froc(froc_panels, out / FROC_PNG)
    box_panels = {
        row.label: {run.name: row.sample(run) for run in runs}
        for row in comparison.rows
        if row.unit != "cohort"
    }
    plot_boxes(box_panels, out / BOXPLOTS_PNG)
    payload = {
        "arms": [{"name": run.name, "path": str(run.path)} for run in runs],
        "n_resamples": n_resamples,
        "rows": [
            {
                "id": row.id,
                "metric": row.label,
                "unit": row.unit,
                "estimate": row.estimate,
                "arms": {
                    name: {
                        field: _json_number(getattr(cell, field))
                        for field in ("estimate", "ci_low", "ci_high", "q1", "q3")
                    }
                    | {"n": cell.n}
                    for name, cell in comparison.cells[row.id].items()
                },
                "pvalues": {
                    pair: {"p": _json_number(p), "p_bonferroni": _json_number(p_adj), "n": n}
                    for pair, (p, p_adj, n) in comparison.pvalues[row.id].items()
                },
            }
            for row in comparison.rows
        ],
    }
    write_json(out / COMPARISON_JSON, payload)
    write_text(out / REPORT_MD, render_markdown(comparison, n_resamples))
    return [out / REPORT_MD, out / COMPARISON_JSON, out / FROC_PNG, out / BOXPLOTS_PNG]


def _none_to_nan(curve: tuple[list, list]) -> tuple[list[float], list[float]]:
    return tuple([math.nan if v is None else v for v in values] for values in curve)  # type: ignore[return-value]
