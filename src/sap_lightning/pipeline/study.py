"""The whole study in one command (``sap study``, ``make demo``).

Steps, each skipped when its output is already complete, so an interrupted study continues:

1. the synthetic cohort (or ``dataset_root``), checked, cached and split (stratified folds,
   one threshold-tuning fold);
2. stage 1: skeleton pretraining on the healthy scans; SSL pretraining on the same scans;
3. for every arm (scratch, SSL, SAP) and every test fold: lesion fine-tuning on the other test
   folds (never on the tuning fold);
4. per arm, the threshold is chosen on the tuning fold with the first fold's model (which never
   saw it) and applied unchanged to every test fold (docs/evaluation.md, the "clean variant");
5. every test patient is predicted by the model of its fold, evaluated lesion-wise, and the arms
   are compared in ``<report_dir>/report.md`` (Table 1, p-values, FROC and box plots).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sap_lightning.cache import preprocess_dataset
from sap_lightning.cache.reader import open_cache
from sap_lightning.cache.splits import Splits, cache_lesion_counts, split_dataset
from sap_lightning.config import StudyConfig, load_config, to_yaml
from sap_lightning.core.errors import SapError
from sap_lightning.core.io import read_json, write_json, write_text
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.core.windows import DEFAULT_THRESHOLD
from sap_lightning.dataset import layout
from sap_lightning.dataset.validate import require_valid_dataset
from sap_lightning.evaluation.diagnostics import diagnose, diagnostics_markdown, plot_curves
from sap_lightning.evaluation.predictions import (
    EvaluationSettings,
    evaluate_predictions,
    tune_on_predictions,
    write_evaluation,
)
from sap_lightning.evaluation.report import (
    Comparison,
    compare_runs,
    load_evaluation,
    write_comparison,
)
from sap_lightning.evaluation.statistics import paired_wilcoxon_power
from sap_lightning.evaluation.threshold import load_threshold, save_threshold
from sap_lightning.inference.outputs import PREDICTION_JSON
from sap_lightning.inference.predict import THRESHOLD_FILE, predict_cases
from sap_lightning.pipeline.train import run_training
from sap_lightning.synthetic import make_phantom_cohort

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"
TIMINGS_FILE = "timings.md"
"""Wall time of every study step, next to the report (not in it: it changes between reruns)."""
DONE_FILE = "study_step.json"
"""Written into a step's folder when the step completed; a folder without it is redone."""


@dataclass
class StudyResult:
    report: Path
    arms: dict[str, Path] = field(default_factory=dict)
    """Arm name -> evaluation folder."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step."""


def _done(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def _mark_done(folder: Path, **info: Any) -> None:
    write_json(folder / DONE_FILE, info)


def _fresh(folder: Path) -> Path:
    """Clear an incomplete step folder left by an interrupted study (never a completed one)."""
    if folder.exists() and not _done(folder):
        log.info("redoing incomplete step %s", folder)
        shutil.rmtree(folder)
    return folder


class _Clock:
    """Wall time per step; a step whose folder was already complete is reported as reused."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def step(self, name: str, action: Callable[[], Any], folder: Path | None = None) -> Any:
        if folder is not None and _done(folder):
            log.info("study: %s (reusing %s)", name, folder)
            self.reused.append(name)
            return action()
        start = time.perf_counter()
        log.info("study: %s", name)
        result = action()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result

    def describe(self) -> str:
        steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items())
        text = f"{sum(self.seconds.values()) / 60:.1f} min ({steps})"
        if self.reused:
            text += f"; reused from an earlier invocation: {', '.join(self.reused)}"
        return text


def _cohort(study: StudyConfig) -> tuple[Path, Path]:
    """The skeleton and lesion datasets, generated when the study owns its data."""
    if study.dataset_root:
        root = Path(study.dataset_root)
    else:
        root = Path(study.data_dir) / "phantoms"
        if not (root / "lesion" / "dataset.json").is_file():
            make_phantom_cohort(
                root,
                study.healthy,
                study.patients,
                seed=study.seed,
                shape=study.phantom_shape,
                spacing=study.phantom_spacing,
            )
    return root / "skeleton", root / "lesion"


def _prepare(study: StudyConfig, skeleton: Path, lesion: Path) -> Splits:
    # Each dataset is validated once, before anything is written; the result is passed down.
    infos = {dataset: require_valid_dataset(dataset) for dataset in (skeleton, lesion)}
    for dataset, info in infos.items():
        preprocess_dataset(dataset, layout.default_cache_path(dataset), info=info)
    split_dataset(
        skeleton, seed=study.seed, val_fraction=study.skeleton_val_fraction, info=infos[skeleton]
    )
    counts = cache_lesion_counts(open_cache(layout.default_cache_path(lesion)))
    _, splits, _ = split_dataset(
        lesion,
        n_folds=study.n_folds,
        tuning_fold=study.tuning_fold,
        seed=study.seed,
        info=infos[lesion],
        lesion_counts=counts,
    )
    return splits


def _train(config_path: str, overrides: Sequence[str], run_dir: Path) -> Path:
    """One training run into ``run_dir``: skipped when complete, resumed from its last
    checkpoint when an earlier invocation was interrupted, started afresh otherwise."""
    if _done(run_dir):
        return run_dir
    if last_checkpoint_path(run_dir).is_file():
        log.info("resuming interrupted run %s", run_dir)
        extra = [f"run_dir={run_dir}", "resume=true"]
    else:
        extra = [f"run_dir={_fresh(run_dir)}"]
    cfg = load_config(config_path, [*overrides, *extra])
    result = run_training(cfg)
    if result.interrupted:
        raise SapError(f"training in {run_dir} was interrupted; run the study again to resume")
    _mark_done(run_dir, config=config_path, metrics=result.metrics)
    return run_dir


def _arm(
    study: StudyConfig,
    arm: str,
    config_path: str,
    splits: Splits,
    lesion: Path,
    pretrained: dict[str, Path],
    clock: _Clock,
) -> Path:
    """Fine-tune one arm on every test fold, tune its threshold, predict and evaluate."""
    arm_dir = Path(study.runs_dir) / arm
    init_overrides = [f"model.pretrained={pretrained[arm]}"] if arm in pretrained else []
    common = [
        *study.overrides,
        *study.finetune_overrides,
        f"data.dataset={lesion}",
        f"data.n_folds={study.n_folds}",
        f"data.tuning_fold={study.tuning_fold}",
        f"seed={study.seed}",
        *init_overrides,
    ]
    fold_runs = {
        fold: clock.step(
            f"fine-tune {arm} fold {fold}",
            lambda fold=fold: _train(
                config_path, [*common, f"data.fold={fold}"], arm_dir / f"fold{fold}"
            ),
            arm_dir / f"fold{fold}",
        )
        for fold in splits.test_folds
    }
    settings = EvaluationSettings()
    tuning_dir = arm_dir / "tuning"
    first_run = fold_runs[splits.test_folds[0]]
    if not _done(tuning_dir):

        def tune() -> None:
            predict_cases(
                first_run,
                lesion,
                _fresh(tuning_dir),
                case_ids=splits.tuning_cases(),
                threshold=DEFAULT_THRESHOLD,  # masks unused: tuning reads the probabilities
                validate_input=False,  # checked in _prepare
                overlap=study.predict_overlap,
                progress=False,
            )
            choice = tune_on_predictions(tuning_dir, lesion, splits.tuning_cases(), settings)
            save_threshold(tuning_dir / THRESHOLD_FILE, choice)
            _mark_done(tuning_dir, threshold=choice.threshold)

        clock.step(f"tune threshold {arm}", tune)
    threshold = load_threshold(tuning_dir / THRESHOLD_FILE)
    predictions = arm_dir / "predictions"
    # one sap predict folder per fold model: a prediction folder holds one model's outputs
    fold_predictions = [predictions / f"fold{fold}" for fold in fold_runs]
    if not _done(predictions):

        def predict() -> None:
            _fresh(predictions)
            for fold, run in fold_runs.items():
                # The run folder keeps the threshold it is used with (sap predict reads it).
                write_text(run / THRESHOLD_FILE, (tuning_dir / THRESHOLD_FILE).read_text())
                predict_cases(
                    run,
                    lesion,
                    predictions / f"fold{fold}",
                    case_ids=splits.test_cases(fold),
                    threshold=threshold,
                    validate_input=False,  # checked in _prepare
                    overlap=study.predict_overlap,
                    progress=False,
                )
            _mark_done(predictions, threshold=threshold)

        clock.step(f"predict {arm}", predict)
    evaluation = arm_dir / "evaluation"
    test_cases = [case for fold in splits.test_folds for case in splits.test_cases(fold)]

    def evaluate() -> None:
        result = evaluate_predictions(
            fold_predictions,
            lesion,
            test_cases,
            EvaluationSettings(threshold=threshold, thresholds=settings.thresholds),
        )
        write_evaluation(result, evaluation)

    clock.step(f"evaluate {arm}", evaluate)
    return evaluation


def run_study(study: StudyConfig) -> StudyResult:
    """Run every step of the study and write the comparison report."""
    clock = _Clock()
    runs = Path(study.runs_dir)
    skeleton, lesion = clock.step("cohort", lambda: _cohort(study))
    splits = clock.step("check, preprocess, split", lambda: _prepare(study, skeleton, lesion))
    seed = [f"seed={study.seed}"]
    pretrain_run = clock.step(
        "skeleton pretraining",
        lambda: _train(
            study.pretrain_config,
            [*study.overrides, *study.pretrain_overrides, f"data.dataset={skeleton}", *seed],
            runs / "pretrain",
        ),
        runs / "pretrain",
    )
    ssl_run = clock.step(
        "SSL pretraining",
        lambda: _train(
            study.ssl_config,
            [*study.overrides, *study.ssl_overrides, f"data.dataset={skeleton}", *seed],
            runs / "ssl",
        ),
        runs / "ssl",
    )
    pretrained = {"sap": pretrain_run, "ssl": ssl_run}
    for init, config_path in study.pretrain_runs.items():  # e.g. mae: the arm of that name
        pretrained[init] = clock.step(
            f"{init} pretraining",
            lambda config_path=config_path, init=init: _train(
                config_path,
                [*study.overrides, *study.ssl_overrides, f"data.dataset={skeleton}", *seed],
                runs / f"pretrain_{init}",
            ),
            runs / f"pretrain_{init}",
        )
    arms = {
        arm: _arm(study, arm, config_path, splits, lesion, pretrained, clock)
        for arm, config_path in study.finetune_configs.items()
    }
    report_dir = Path(study.report_dir)
    evaluations = [load_evaluation(path, name=arm) for arm, path in arms.items()]
    comparison = clock.step(
        "compare", lambda: compare_runs(evaluations, n_resamples=study.n_resamples, seed=study.seed)
    )
    write_comparison(comparison, report_dir, n_resamples=study.n_resamples)
    report = report_dir / "report.md"
    header = _study_header(study, splits, comparison)
    learning = _learning_section(study, runs, pretrain_run, ssl_run, splits, report_dir)
    write_text(report, header + learning + report.read_text())
    write_text(
        report_dir / TIMINGS_FILE, f"# Study `{study.name}`: wall time\n\n{clock.describe()}\n"
    )
    write_text(report_dir / "study.yaml", to_yaml(study))
    return StudyResult(report=report, arms=arms, seconds=clock.seconds)


VERDICT_ROWS = (
    "F2 (detection score)",
    "lesion sensitivity",
    "FP per exam",
    "per-patient mean Dice",
)
"""Table 1 rows the verdict quotes (the paper's headline is the F2 detection score)."""


SIGNIFICANCE_LEVEL = 0.05
"""Family-wise level the verdict applies to the Bonferroni-corrected p-value."""


def verdict(comparison: Comparison, arm: str = "sap", baseline: str = "scratch") -> str:
    """Plain-language answer to "did SAP beat the baseline?", from the table's own numbers."""
    if arm not in comparison.names or baseline not in comparison.names:
        return f"No verdict: the study has no '{arm}' and '{baseline}' arms to compare."
    f2 = comparison.cells["F2 (detection score)"]
    p_f2 = comparison.pvalues["F2 (detection score)"].get(
        f"{baseline} vs {arm}"
    ) or comparison.pvalues["F2 (detection score)"].get(f"{arm} vs {baseline}")
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
            level = SIGNIFICANCE_LEVEL / max(1, len(comparison.pvalues["F2 (detection score)"]))
            significance += _power_note(comparison, arm, baseline, p_f2[2], level)
    lines = [
        f"**Verdict: {arm.upper()} {outcome} the {baseline} baseline on the median patient F2 "
        f"({ours:.3f} vs {theirs:.3f}{p_text}).{significance}**",
        "",
        "| metric | " + " | ".join(comparison.names) + " |",
        "|---|" + "---|" * len(comparison.names),
    ]
    for row in VERDICT_ROWS:
        cells = comparison.cells[row]
        lines.append(f"| {row} | " + " | ".join(cells[n].format() for n in comparison.names) + " |")
    return "\n".join(lines) + "\n"


POWER_EFFECT = 0.8
"""Standardised paired effect (Cohen's d_z) the verdict quotes the test's power for."""


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


def _learning_section(
    study: StudyConfig,
    runs: Path,
    pretrain_run: Path,
    ssl_run: Path,
    splits: Splits,
    report_dir: Path,
) -> str:
    """Did every network learn? The learning metric of each run, its curves, and the inference
    window validation, tuning and prediction used."""
    named: dict[str, tuple[str, Path]] = {
        "skeleton pretraining": ("skeleton", pretrain_run),
        "SSL pretraining": ("ssl", ssl_run),
    }
    for arm in study.finetune_configs:
        for fold in splits.test_folds:
            named[f"{arm} fold {fold}"] = ("lesion", runs / arm / f"fold{fold}")
    diagnostics = [diagnose(name, task, run) for name, (task, run) in named.items()]
    plot_curves(named, report_dir / CURVES_PNG)
    window = _inference_window(runs / next(iter(study.finetune_configs)) / "tuning")
    return "\n".join(
        [
            "## Did the networks learn?",
            "",
            "Last logged values of the metric that shows learning (validation at the run's "
            "validation threshold; SSL terms with their chance level in brackets). Curves: "
            f"[{CURVES_PNG}]({CURVES_PNG}).",
            "",
            diagnostics_markdown(diagnostics),
            f"Inference window (validation, threshold tuning and prediction alike): {window}.",
            "",
            "",
        ]
    )


def _inference_window(prediction_dir: Path) -> str:
    """The sliding-window size recorded by ``sap predict`` in a prediction folder."""
    try:
        record = read_json(prediction_dir / PREDICTION_JSON)
    except (OSError, ValueError):
        return "not recorded"
    outside = "; voxels outside the body are background" if record.get("body_only") else ""
    return f"{record.get('window')} voxels, overlap {record.get('overlap')}{outside}"


def _machine_line() -> str:
    """What decides bitwise results besides the seed: the torch version and its CPU threads
    (the thread count changes the order of floating-point sums; ``SAP_NUM_THREADS`` pins it)."""
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def _study_header(study: StudyConfig, splits: Splits, comparison: Comparison) -> str:
    test_cases = sum(len(splits.test_cases(fold)) for fold in splits.test_folds)
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
        f"- Experiments: pretraining `{study.pretrain_config}`, SSL `{study.ssl_config}`, arms "
        + ", ".join(f"{arm} `{path}`" for arm, path in study.finetune_configs.items())
        + (f"; overrides `{' '.join(study.overrides)}`" if study.overrides else "")
        + ".",
        f"- Wall time of every step: [{TIMINGS_FILE}]({TIMINGS_FILE}) (kept out of this report, so "
        "that a rerun with the same seed on the same machine writes the same report).",
        f"- Machine: {_machine_line()}.",
        "",
        verdict(comparison),
    ]
    return "\n".join(lines) + "\n"
