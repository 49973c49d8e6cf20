"""The words of the study report (``sap study``): header, verdict and "Did the networks learn?".

``pipeline/study.py`` runs the study and hands the pieces here; everything a reader sees above
Table 1 is written by this module, from the comparison's own numbers and the runs' own logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap_lightning.cache.splits import Splits
from sap_lightning.config import StudyConfig
from sap_lightning.core.arms import LearningTerm
from sap_lightning.core.io import read_json
from sap_lightning.core.precision import describe_precision
from sap_lightning.core.protocol import BOOTSTRAP_RESAMPLES, SIGNIFICANCE_LEVEL
from sap_lightning.evaluation.case_pictures import ShownPatient
from sap_lightning.evaluation.diagnostics import (
    RunDiagnostics,
    diagnose,
    diagnostics_markdown,
    plot_curves,
)
from sap_lightning.evaluation.endpoints import observed_power, paired_effect
from sap_lightning.evaluation.report import (
    PRIMARY_PAIR,
    Comparison,
    arm_pairs,
    paired_patients,
)
from sap_lightning.inference.outputs import PREDICTION_JSON

CURVES_PNG = "curves.png"
LEARNING_MD = "learning.md"
"""The report of a ``stage: training`` study: the learning section alone."""
PATIENTS_PNG = "patients.png"
TIMINGS_FILE = "timings.md"
"""Wall time of every study step, next to the report (not in it: it changes between reruns)."""

PRIMARY_ROW = "f2"
"""The Table 1 row the verdict decides on (the paper's headline, the F2 detection score)."""
VERDICT_ROWS = ("f2", "sensitivity", "n_fp", "patient_mean_dice")
"""Table 1 rows (ids) the verdict quotes."""


@dataclass(frozen=True)
class LearningRun:
    """A run of the study whose learning the report shows."""

    name: str
    terms: tuple[LearningTerm, ...]
    run_dir: Path


ONE_DRAW = (
    "This study is one draw of the cohort, the splits and every network's initialisation; the "
    "arms' order can change from one draw to the next. `sap study --repeats N` pools several "
    '(docs/protocol.md, "Repeats").\n'
)


def paired_f2_differences(comparison: Comparison, arm: str, baseline: str) -> np.ndarray:
    """Per patient with a lesion that both arms evaluated: arm's F2 minus baseline's."""
    runs = {run.name: run for run in comparison.runs}
    both = paired_patients(runs[arm], runs[baseline], PRIMARY_ROW)
    differences = (both[f"{PRIMARY_ROW}_a"] - both[f"{PRIMARY_ROW}_b"]).to_numpy(np.float64)
    return differences[~np.isnan(differences)]


def verdict(comparison: Comparison, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> str:
    """The report's headline: the primary endpoint of docs/protocol.md (the paired patient F2
    difference of the primary pair, its Hodges-Lehmann estimate, bootstrap CI and Wilcoxon
    test, and the test's power from the observed pairs), then the arms' medians."""
    if comparison.primary is None:
        return (
            "\n".join(
                [
                    f"No primary endpoint: the study compares {', '.join(comparison.names)}, not "
                    f"{' and '.join(PRIMARY_PAIR)}.",
                    "",
                    *paired_effects(comparison, n_resamples, seed),
                ]
            )
            + "\n"
        )
    arm, baseline = comparison.primary
    differences = paired_f2_differences(comparison, arm, baseline)
    effect = paired_effect(differences, n_resamples, seed=seed)
    power = observed_power(differences, n_resamples=n_resamples, seed=seed)
    if math.isnan(effect.estimate):
        outcome = "could not be compared (no patient with a lesion in both arms)"
    elif effect.estimate > 0:
        outcome = f"was higher than {baseline}'s"
    elif effect.estimate < 0:
        outcome = f"was lower than {baseline}'s"
    else:
        outcome = f"did not differ from {baseline}'s"
    supported = effect.significant
    labels = {row.id: row.label for row in comparison.rows}
    lines = [
        f"**Primary endpoint ([protocol](docs/protocol.md)): {arm.upper()} minus {baseline} in "
        f"patient F2, Hodges-Lehmann {effect.format()} (95% bootstrap CI, {effect.n} paired "
        f"patients), Wilcoxon p = {effect.p:.3g}. {arm.upper()}'s F2 {outcome}; the "
        f"difference is {'' if supported else 'not '}significant at {SIGNIFICANCE_LEVEL:g}. "
        f"Power of the test at this size, from the observed pairs: {power:.2f}.**",
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
    return "\n".join([*lines, "", *paired_effects(comparison, n_resamples, seed)]) + "\n"


def paired_effects(
    comparison: Comparison, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> list[str]:
    """Every arm pair's paired patient F2 effect with the primary endpoint's estimator, CI and
    test (docs/protocol.md, secondary endpoints), the secondary p-values also corrected."""
    pairs = arm_pairs(comparison.names)
    if not pairs or pairs == [comparison.primary]:  # none, or only the headline's
        return []
    rows = []
    for arm, baseline in pairs:
        differences = paired_f2_differences(comparison, arm, baseline)
        effect = paired_effect(differences, n_resamples, seed=seed)
        tested = comparison.pvalues[PRIMARY_ROW]
        p_adjusted = (tested.get(f"{baseline} vs {arm}") or tested[f"{arm} vs {baseline}"])[1]
        primary = (arm, baseline) == comparison.primary
        rows.append(
            f"| {arm} minus {baseline}{' (primary)' if primary else ''} | {effect.format()} | "
            f"{effect.p:.3g} | {'-' if primary else f'{p_adjusted:.3g}'} | {effect.n} |"
        )
    return [
        "Paired patient F2 differences, every pair of arms: Hodges-Lehmann estimate, 95% "
        "bootstrap CI, Wilcoxon (Pratt) p; the secondary pairs' p also Bonferroni-corrected "
        "over their number.",
        "",
        "| pair | F2 difference [95% CI] | p | Bonferroni p | patients |",
        "|---|---|---|---|---|",
        *rows,
    ]


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
            "validation threshold; SSL terms with their chance level in brackets). FROC AUC: "
            "the area under the validation's mean sensitivity against false positives per exam "
            "from 0 to 15 (at most 15), over every threshold of the grid: 0 when no voxel "
            "reaches its lowest threshold (0.05), as on the loss plateau with a head prior "
            f"below it. Curves: [{CURVES_PNG}]({CURVES_PNG}).",
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
    """The report's opening: the verdict (the protocol's headline, first under the title),
    then cohort, folds, the experiment file of every pretraining and arm ((label, path)
    pairs) and machine."""
    test_cases = sum(len(splits.test_cases(fold)) for fold in splits.test_folds)
    pretraining = [f"{label} `{path}`" for label, path in pretraining_files]
    fine_tuning = [f"{arm} `{path}`" for arm, path in arm_files]
    lines = [
        f"# Study `{study.name}`",
        "",
        verdict(comparison, study.n_resamples, study.seed),
        ONE_DRAW,
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
