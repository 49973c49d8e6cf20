"""The pooled report of a study's repeats (``sap study --repeats N``, docs/protocol.md): each
repeat's primary effect, the effect pooled over repeats with a CI that resamples repeats and
then patients, the secondary pairs the same way, and every repeat's learning diagnostics.

One repeat is one draw of the cohort, the splits and every network's initialisation; the
pooled CI carries that variation, which a single study's CI (patients only) does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap_lightning.config import StudyConfig
from sap_lightning.core.io import write_json, write_text
from sap_lightning.evaluation.diagnostics import LESION_LEARNING, diagnose
from sap_lightning.evaluation.endpoints import PairedEffect, paired_effect, pooled_effect
from sap_lightning.evaluation.report import (
    PRIMARY_PAIR,
    arm_pairs,
    load_evaluation,
    paired_patients,
)
from sap_lightning.evaluation.statistics import bonferroni
from sap_lightning.evaluation.study_report import LearningRun

REPORT_MD = "report.md"
POOLED_JSON = "pooled.json"
LEARNED_SENSITIVITY = 0.5
"""Validation sensitivity at 0.5 above which a fine-tune has left the loss plateau."""
FROC_AREA = "val/froc_auc"
"""The fine-tunes' threshold-free learning term (``diagnostics.LESION_LEARNING``)."""


@dataclass(frozen=True)
class RepeatResult:
    """What the pooled report reads of one repeat."""

    repeat: int
    config: StudyConfig
    evaluations: dict[str, Path]
    """Arm -> its evaluation folder (``sap evaluate``'s layout)."""
    learning: list[LearningRun]
    report: Path


def _f2_differences(result: RepeatResult, arm: str, baseline: str) -> np.ndarray:
    runs = {name: load_evaluation(path, name=name) for name, path in result.evaluations.items()}
    both = paired_patients(runs[arm], runs[baseline], "f2")
    differences = (both["f2_a"] - both["f2_b"]).to_numpy(np.float64)
    return differences[~np.isnan(differences)]


def _learning_cells(result: RepeatResult) -> list[str]:
    """Per pretraining run its terms; then the fine-tunes' validation sensitivity at 0.5, their
    FROC areas (0: no voxel reaches the lowest threshold, as on the loss plateau) and how many
    networks hold a stage whose every weight is zero."""
    cells = []
    sensitivities, froc_areas = [], []
    with_zero_stages = 0
    for run in result.learning:
        diagnostics = diagnose(run.name, run.terms, run.run_dir)
        with_zero_stages += bool(diagnostics.zero_stages)
        if run.terms == LESION_LEARNING:
            sensitivities.append(diagnostics.values[LESION_LEARNING[0].key])
            froc_areas.append(diagnostics.values.get(FROC_AREA, math.nan))
            continue
        terms = ", ".join(
            f"{term.label} {diagnostics.values[term.key]:.3f}"
            + (f" ({diagnostics.chance[term.key]:.3f})" if term.key in diagnostics.chance else "")
            for term in run.terms
        )
        cells.append(f"{run.name}: {terms}")
    values, areas = (np.array(v, dtype=np.float64) for v in (sensitivities, froc_areas))
    above = int(np.sum(values > LEARNED_SENSITIVITY))
    logged = areas[~np.isnan(areas)]
    froc = (
        f"FROC AUC {logged.min():.2f}-{logged.max():.2f}, {int(np.sum(logged == 0))} at 0"
        if logged.size
        else "FROC AUC not logged"
    )
    cells.append(
        f"fine-tunes {np.nanmin(values):.3f}-{np.nanmax(values):.3f}, "
        f"{above} of {len(values)} above {LEARNED_SENSITIVITY:g}; {froc}"
        if values.size
        else "no fine-tune"
    )
    if result.learning:
        cells.append(f"stages at zero in {with_zero_stages} of {len(result.learning)} networks")
    return cells


def write_pooled_report(study: StudyConfig, results: Sequence[RepeatResult], out_dir: Path) -> Path:
    """``<out_dir>/report.md`` and ``pooled.json``: the repeats' effects and learning."""
    arms = list(study.arms)
    pairs = arm_pairs(arms)
    n = study.n_resamples
    per_repeat: dict[tuple[str, str], list[np.ndarray]] = {pair: [] for pair in pairs}
    for result in results:
        for pair in pairs:
            per_repeat[pair].append(_f2_differences(result, *pair))
    pooled = {
        pair: pooled_effect(groups, n, seed=study.seed) for pair, groups in per_repeat.items()
    }
    # Each repeat's effect with its own seed, as its own report computed it: the same interval.
    effects = {
        pair: [paired_effect(d, n, seed=r.config.seed) for d, r in zip(groups, results)]
        for pair, groups in per_repeat.items()
    }
    lines = [f"# Study `{study.name}`: {len(results)} repeats", ""]
    if PRIMARY_PAIR in pooled:  # the protocol's headline: the report's first line
        arm, baseline = PRIMARY_PAIR
        effect = pooled[PRIMARY_PAIR]
        excludes = not (effect.ci_low <= 0 <= effect.ci_high)
        if math.isnan(effect.estimate):
            outcome = "could not be compared (no patient with a lesion in both arms)."
        elif excludes:
            outcome = (
                f"The interval excludes 0: {arm.upper()}'s F2 was "
                f"{'higher' if effect.estimate > 0 else 'lower'} than {baseline}'s over these "
                "repeats."
            )
        else:
            outcome = (
                f"The interval includes 0: these repeats do not tell {arm.upper()} and "
                f"{baseline} apart."
            )
        lines += [
            f"**Primary endpoint pooled over {len(results)} repeats: {arm.upper()} minus "
            f"{baseline} in patient F2, Hodges-Lehmann {effect.format()} (95% CI resampling "
            f"repeats, then patients; {effect.n} pairs). {outcome}**",
            "",
        ]
    lines += [
        f"Repeat r draws the cohort, the splits and every network with seed {study.seed} + r "
        "(docs/protocol.md); each has its own report:",
        "",
        *(
            f"- repeat {r.repeat} (seed {r.config.seed}): "
            f"[{r.report}]({Path('..') / r.report.relative_to(r.report.parents[1])})"
            for r in results
        ),
        "",
    ]
    lines += ["## Effects per repeat", ""]
    lines += _effects_table(pairs, effects, pooled)
    lines += [
        "",
        "## Did the networks learn? (per repeat)",
        "",
        "Each pretraining's terms (chance level in brackets) and the fine-tunes' validation "
        f"sensitivity at 0.5 (above {LEARNED_SENSITIVITY:g}: the protocol's learning criterion) "
        "and FROC area (0-15 false positives per exam, over every threshold: 0 when no voxel "
        "reaches the lowest, as on the loss plateau); the repeats' own reports have every "
        "run's curves.",
        "",
        "| repeat | learning |",
        "|---|---|",
        *(f"| {r.repeat} | " + "; ".join(_learning_cells(r)) + " |" for r in results),
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / POOLED_JSON, _payload(study, results, pooled, effects))
    return write_text(out_dir / REPORT_MD, "\n".join(lines))


def _effects_table(
    pairs: Sequence[tuple[str, str]],
    effects: dict[tuple[str, str], list[PairedEffect]],
    pooled: dict[tuple[str, str], PairedEffect],
) -> list[str]:
    header = "| repeat | " + " | ".join(f"{a} minus {b}" for a, b in pairs) + " |"
    rows = [header, "|---|" + "---|" * len(pairs)]
    count = len(next(iter(effects.values()))) if effects else 0
    secondary = sum(pair != PRIMARY_PAIR for pair in pairs)
    for r in range(count):
        cells = []
        for pair in pairs:
            effect = effects[pair][r]
            corrected = (
                ""
                if pair == PRIMARY_PAIR or secondary < 2
                else f", Bonferroni p = {_p(_corrected_p(pair, effect.p, pairs))}"
            )
            cells.append(f"{effect.format()}, p = {_p(effect.p)}{corrected} (n = {effect.n})")
        rows.append(f"| {r} | " + " | ".join(cells) + " |")
    rows.append(
        "| pooled | "
        + " | ".join(f"**{pooled[pair].format()}** (n = {pooled[pair].n})" for pair in pairs)
        + " |"
    )
    rows += [
        "",
        "Hodges-Lehmann estimate of the paired patient F2 differences with its 95% bootstrap CI; "
        "per repeat the Pratt Wilcoxon p-value (the primary pair uncorrected; the secondary "
        "pairs also Bonferroni-corrected over their number, docs/protocol.md; their CIs are "
        "not corrected); pooled: repeats, then patients, resampled.",
    ]
    return rows


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}"


def _corrected_p(pair: tuple[str, str], p: float, pairs: Sequence[tuple[str, str]]) -> float:
    """The protocol's p: the primary pair's as it is, the others' Bonferroni-corrected over
    the number of secondary pairs."""
    secondary = sum(other != PRIMARY_PAIR for other in pairs)
    return p if pair == PRIMARY_PAIR else float(bonferroni([p], max(1, secondary))[0])


def _payload(study, results, pooled, effects) -> dict:
    def effect(e: PairedEffect, pair: tuple[str, str] | None = None) -> dict:
        values = dict(vars(e))
        if pair is not None:
            values["p_bonferroni"] = _corrected_p(pair, e.p, list(pooled))
        return {
            key: (None if isinstance(v, float) and math.isnan(v) else v)
            for key, v in values.items()
        }

    return {
        "study": study.name,
        "repeats": [{"repeat": r.repeat, "seed": r.config.seed} for r in results],
        "pairs": [
            {
                "arm": a,
                "baseline": b,
                "pooled": effect(pooled[(a, b)]),
                "per_repeat": [effect(e, (a, b)) for e in effects[(a, b)]],
            }
            for a, b in pooled
        ],
    }
