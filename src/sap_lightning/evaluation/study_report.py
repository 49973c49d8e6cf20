"""The words of the study report (``sap study``): header, verdict and "Did the networks learn?".

``pipeline/study.py`` runs the study and hands the pieces here; everything a reader sees above
Table 1 is written by this module, from the comparison's own numbers and the runs' own logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sap_lightning.cache.splits import Splits
from sap_lightning.config import StudyConfig
from sap_lightning.core.arms import LearningTerm
from sap_lightning.core.io import read_json
from sap_lightning.core.precision import describe_precision
from sap_lightning.core.protocol import SIGNIFICANCE_LEVEL
from sap_lightning.evaluation.case_pictures import ShownPatient
from sap_lightning.evaluation.diagnostics import (
    RunDiagnostics,
    diagnose,
    diagnostics_markdown,
    plot_curves,
)
from sap_lightning.evaluation.report import Comparison
from sap_lightning.evaluation.statistics import paired_wilcoxon_power
from sap_lightning.inference.outputs import PREDICTION_JSON

CURVES_PNG = "curves.png"
PATIENTS_PNG = "patients.png"
TIMINGS_FILE = "timings.md"
"""Wall time of every study step, next to the report (not in it: it changes between reruns)."""

PRIMARY_ROW = "f2"
"""The Table 1 row the verdict decides on (the paper's headline, the F2 detection score)."""
VERDICT_ROWS = ("f2", "sensitivity", "n_fp", "patient_mean_dice")
"""Table 1 rows (ids) the verdict quotes."""
POWER_EFFECT = 0.8
"""Standardised paired effect (Cohen's d_z) the verdict quotes the test's power for."""


@dataclass(frozen=True)
class LearningRun:
    """A run of the study whose learning the report shows."""

    name: str
    terms: tuple[LearningTerm, ...]
    run_dir: Path


def verdict(comparison: Comparison, arm: str = "sap", baseline: str = "scratch") -> str:
    """Plain-language answer to "did SAP beat the baseline?", from the table's own numbers."""
    if arm not in comparison.names or baseline not in comparison.names:
        return f"No verdict: the study has no '{arm}' and '{baseline}' arms to compare."
    f2 = comparison.cells[PRIMARY_ROW]
    pvalues = comparison.pvalues[PRIMARY_ROW]
    p_f2 = pvalues.get(f"{baseline} vs {arm}") or pvalues.get(f"{arm} vs {baseline}")
    ours, theirs = f2[arm].estimate, f2[baseline].estimate
    if math.isnan(ours) or math.isnan(theirs):
        outcome = "could not be compared (F2 undefined for one arm)"
    elif ours > theirs:
        outcome = "beat"
    elif ours == theirs:
        outcome = "tied with"
    else:
        outcome = "did not beat"
    p_text = significance = ""
    if p_f2 is not None:
        p_text = f", paired Wilcoxon p = {p_f2[0]:.3g} (Bonferroni {p_f2[1]:.3g})"
        # A higher median alone is not a finding: say whether the corrected test supports it.
        supported = p_f2[1] < SIGNIFICANCE_LEVEL
        significance = (
            f" The difference is {'' if supported else 'not '}significant at "
            f"{SIGNIFICANCE_LEVEL:g} after Bonferroni correction."
        )
        if not supported:
            level = SIGNIFICANCE_LEVEL / max(1, len(pvalues))
            significance += _power_note(comparison, arm, baseline, p_f2[2], level)
    labels = {row.id: row.label for row in comparison.rows}
    lines = [
        f"**Verdict: {arm.upper()} {outcome} the {baseline} baseline on the median patient F2 "
        f"({ours:.3f} vs {theirs:.3f}{p_text}).{significance}**",
        "",
        "| metric | " + " | ".join(comparison.names) + " |",
        "|---|" + "---|" * len(comparison.names),
    ]
    for row in VERDICT_ROWS:
        cells = comparison.cells[row]
        lines.append(
            f"| {labels.get(row, row)} | "
            + " | ".join(cells[n].format() for n in comparison.names)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _power_note(comparison: Comparison, arm: str, baseline: str, n_pairs: int, level: float) -> str:
    """Why a difference can miss significance: what the design can see, and what was seen."""
    power = paired_wilcoxon_power(n_pairs, POWER_EFFECT, level)
    text = (
        f" With {n_pairs} paired patients the test finds a standardised paired effect (Cohen's "
        f"d_z) of {POWER_EFFECT:g} with probability {power:.2f} at the corrected level"
    )
    runs = {run.name: run for run in comparison.runs}
    if arm in runs and baseline in runs:
        paired = (
            runs[arm]
            .cases[["case_id", "f2"]]
            .merge(
                runs[baseline].cases[["case_id", "f2"]], on="case_id", suffixes=("_arm", "_base")
            )
        )
        differences = (paired["f2_arm"] - paired["f2_base"]).dropna().to_numpy(float)
        if differences.size > 1 and differences.std(ddof=1) > 0:
            effect = differences.mean() / differences.std(ddof=1)
            text += f"; the observed F2 differences have d_z = {effect:.2f}"
    return text + "."


def learning_section(runs: Sequence[LearningRun], report_dir: Path, window: str) -> str:
    """Did every network learn? The learning terms of each run, its curves (written beside the
    report), and the inference window validation, tuning and prediction used."""
    diagnostics = [diagnose(run.name, run.terms, run.run_dir) for run in runs]
    plot_curves({run.name: (run.terms, run.run_dir) for run in runs}, report_dir / CURVES_PNG)
    return "\n".join(
        [
            "## Did the networks learn?",
            "",
            "Last logged values of the metric that shows learning (validation at the run's "
            "validation threshold; SSL terms with their chance level in brackets). Curves: "
            f"[{CURVES_PNG}]({CURVES_PNG}).",
            "",
            diagnostics_markdown(diagnostics),
            f"Training precision: {training_precisions(diagnostics)}.",
            "",
            f"Inference window (validation, threshold tuning and prediction alike): {window}.",
            "",
            "",
        ]
    )


def training_precisions(diagnostics: Sequence[RunDiagnostics]) -> str:
    """The precision every run trained at, or each run's where they differ."""
    words = {
        run.name: describe_precision(run.precision) if run.precision else "not recorded"
        for run in diagnostics
    }
    if len(set(words.values())) == 1:
        return f"{next(iter(words.values()))} (every run)"
    return ", ".join(f"{name} {word}" for name, word in words.items())


def inference_window(prediction_dir: Path) -> str:
    """The sliding-window size recorded by ``sap predict`` in a prediction folder."""
    try:
        record = read_json(prediction_dir / PREDICTION_JSON)
    except (OSError, ValueError):
        return "not recorded"
    outside = "; voxels outside the body are background" if record.get("body_only") else ""
    precision = describe_precision(record.get("precision") or "32-true")
    return f"{record.get('window')} voxels, overlap {record.get('overlap')}, {precision}{outside}"


def machine_line(run_threads: int | None = None) -> str:
    """What decides bitwise results besides the seed: the torch version and the CPU threads of
    each run (the thread count changes the order of floating-point sums; ``SAP_NUM_THREADS``
    pins it). ``run_threads``: the worker processes' count, else this process's."""
    import torch

    threads = run_threads or torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} CPU threads per run"


def study_header(
    study: StudyConfig,
    splits: Splits,
    comparison: Comparison,
    pretraining_files: Sequence[tuple[str, str]],
    arm_files: Sequence[tuple[str, str]],
    run_threads: int | None = None,
) -> str:
    """The report's opening: cohort, folds, the experiment file of every pretraining and arm
    ((label, path) pairs), machine and verdict."""
    test_cases = sum(len(splits.test_cases(fold)) for fold in splits.test_folds)
    pretraining = [f"{label} `{path}`" for label, path in pretraining_files]
    fine_tuning = [f"{arm} `{path}`" for arm, path in arm_files]
    lines = [
        f"# Study `{study.name}`",
        "",
        (
            f"- Cohort: {study.healthy} healthy scans, {study.patients} patients (synthetic, "
            f"seed {study.seed})."
            if not study.dataset_root
            else f"- Cohort: `{study.dataset_root}` ({len(splits.case_ids)} patients)."
        ),
        f"- Folds: {study.n_folds} (fold {study.tuning_fold} tunes the threshold; "
        f"{len(splits.test_folds)} test folds, {test_cases} test patients).",
        "- Experiments: "
        + "".join(f"{item}, " for item in pretraining)
        + "arms "
        + ", ".join(fine_tuning)
        + (f"; every run with `{' '.join(study.bases)}`" if study.bases else "")
        + (f"; overrides `{' '.join(study.overrides)}`" if study.overrides else "")
        + ".",
        f"- Wall time of every step: [{TIMINGS_FILE}]({TIMINGS_FILE}) (kept out of this report, so "
        "that a rerun with the same seed on the same machine writes the same report).",
        f"- Machine: {machine_line(run_threads)}.",
        "",
        verdict(comparison),
    ]
    return "\n".join(lines) + "\n"


def patients_section(
    comparison: Comparison, patients: Sequence[ShownPatient], baseline: str
) -> str:
    """The three patients every arm is drawn on, with each arm's F2 for them."""
    if not patients:
        return ""
    f2 = {
        run.name: dict(zip(run.cases["case_id"].astype(str), run.cases["f2"], strict=True))
        for run in comparison.runs
    }
    header = "| patient | baseline F2 | " + " | ".join(f"{name} F2" for name in comparison.names)
    lines = [
        "## What each arm found",
        "",
        f"The {baseline} baseline's best, median and worst test patient by F2 (patients with a "
        "lesion; ties by case id), every arm on the same three: coronal and sagittal b1000 MIPs "
        "with true positives, false positives and missed lesions outlined at the arm's tuned "
        f"threshold, counted as in Table 1. [{PATIENTS_PNG}]({PATIENTS_PNG})",
        "",
        header.replace("| baseline F2 | ", "| rule | ") + " |",
        "|---|---|" + "---|" * len(comparison.names),
    ]
    for patient in patients:
        cells = " | ".join(
            f"{f2[name].get(patient.case_id, float('nan')):.3f}" for name in comparison.names
        )
        lines.append(f"| {patient.case_id} | {patient.role} | {cells} |")
    lines += ["", f"![Each arm on three patients]({PATIENTS_PNG})", "", ""]
    return "\n".join(lines)
