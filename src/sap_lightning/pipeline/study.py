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

With ``workers: N`` the steps of 2-5 that do not depend on each other run N at a time, each in
its own process (``pipeline/steps.py``); the report is the same as when they run in turn with
the same torch threads per run.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sap_lightning.cache import preprocess_dataset
from sap_lightning.cache.reader import open_cache
from sap_lightning.cache.splits import Splits, cache_lesion_counts, split_dataset
from sap_lightning.config import StudyConfig, load_config, to_yaml
from sap_lightning.core.errors import SapError
from sap_lightning.core.io import file_lock, read_json, write_text
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.core.threads import usable_cpus
from sap_lightning.core.windows import DEFAULT_THRESHOLD, describe_precision
from sap_lightning.dataset import layout
from sap_lightning.dataset.validate import require_valid_dataset
from sap_lightning.evaluation.diagnostics import (
    RunDiagnostics,
    diagnose,
    diagnostics_markdown,
    plot_curves,
)
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
from sap_lightning.pipeline.steps import (
    Clock,
    Step,
    is_done,
    mark_done,
    run_steps,
    threads_per_worker,
)
from sap_lightning.pipeline.train import run_training
from sap_lightning.synthetic import make_phantom_cohort

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"
TIMINGS_FILE = "timings.md"
"""Wall time of every study step, next to the report (not in it: it changes between reruns)."""
STUDY_LOCK = ".study.lock"
"""Held in ``runs_dir`` while a study runs there."""
COHORT_LOCK = ".cohort.lock"
"""Held in ``data_dir`` while a study generates its synthetic cohort there."""


@dataclass
class StudyResult:
    report: Path
    arms: dict[str, Path] = field(default_factory=dict)
    """Arm name -> evaluation folder."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step (steps overlap when several workers run them)."""
    wall_seconds: float = 0.0
    """Wall time of the whole study."""


def _fresh(folder: Path) -> Path:
    """Clear an incomplete step folder left by an interrupted study (never a completed one)."""
    if folder.exists() and not is_done(folder):
        log.info("redoing incomplete step %s", folder)
        shutil.rmtree(folder)
    return folder


def _cohort(study: StudyConfig) -> tuple[Path, Path]:
    """The skeleton and lesion datasets, generated when the study owns its data."""
    if study.dataset_root:
        root = Path(study.dataset_root)
    else:
        root = Path(study.data_dir) / "phantoms"
        # Two studies started at once on one data_dir: the second waits and reuses the cohort.
        with file_lock(Path(study.data_dir) / COHORT_LOCK):
            if not (root / "lesion" / "dataset.json").is_file():
                make_phantom_cohort(
                    root,
                    study.healthy,
                    study.patients,
                    seed=study.seed,
                    shape=study.phantom_shape,
                    spacing=study.phantom_spacing,
                    workers=study.workers,
                )
    return root / "skeleton", root / "lesion"


def _prepare(study: StudyConfig, skeleton: Path, lesion: Path) -> Splits:
    # Each dataset is validated once, before anything is written; the result is passed down.
    infos = {dataset: require_valid_dataset(dataset) for dataset in (skeleton, lesion)}
    for dataset, info in infos.items():
        preprocess_dataset(
            dataset, layout.default_cache_path(dataset), info=info, workers=study.workers
        )
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


def _train(config_path: str, overrides: Sequence[str], run_dir: Path) -> None:
    """One training run into ``run_dir``: resumed from its last checkpoint when an earlier
    invocation was interrupted, started afresh otherwise."""
    if last_checkpoint_path(run_dir).is_file():
        log.info("resuming interrupted run %s", run_dir)
        extra = [f"run_dir={run_dir}", "resume=true"]
    else:
        extra = [f"run_dir={_fresh(run_dir)}"]
    cfg = load_config(config_path, [*overrides, *extra])
    result = run_training(cfg)
    if result.interrupted:
        raise SapError(f"training in {run_dir} was interrupted; run the study again to resume")
    mark_done(run_dir, config=config_path, metrics=result.metrics)


def _tune(run: Path, lesion: Path, cases: list[str], tuning_dir: Path, overlap: float) -> None:
    """Predict the tuning fold with one fold model and choose the arm's threshold on it."""
    predict_cases(
        run,
        lesion,
        _fresh(tuning_dir),
        case_ids=cases,
        threshold=DEFAULT_THRESHOLD,  # masks unused: tuning reads the probabilities
        validate_input=False,  # checked in _prepare
        overlap=overlap,
        progress=False,
    )
    choice = tune_on_predictions(tuning_dir, lesion, cases, EvaluationSettings())
    save_threshold(tuning_dir / THRESHOLD_FILE, choice)
    mark_done(tuning_dir, threshold=choice.threshold)


def _predict_fold(
    run: Path, lesion: Path, cases: list[str], tuning_dir: Path, out: Path, overlap: float
) -> None:
    """Predict a test fold with its fold model at the arm's tuned threshold: one ``sap
    predict`` folder per fold model."""
    threshold = load_threshold(tuning_dir / THRESHOLD_FILE)
    # The run folder keeps the threshold it is used with (sap predict reads it).
    write_text(run / THRESHOLD_FILE, (tuning_dir / THRESHOLD_FILE).read_text())
    predict_cases(
        run,
        lesion,
        _fresh(out),
        case_ids=cases,
        threshold=threshold,
        validate_input=False,  # checked in _prepare
        overlap=overlap,
        progress=False,
    )
    mark_done(out, threshold=threshold)


def _training_step(
    name: str, config_path: str, overrides: Sequence[str], run_dir: Path, needs: tuple[str, ...]
) -> Step:
    return Step(name, partial(_train, config_path, list(overrides), run_dir), run_dir, needs)


def _arm_steps(
    study: StudyConfig, arm: str, config_path: str, splits: Splits, lesion: Path
) -> list[Step]:
    """Fine-tune one arm on every test fold, tune its threshold on the tuning fold with the
    first fold's model, and predict each test fold with its own model."""
    arm_dir = Path(study.runs_dir) / arm
    init_overrides = []
    needs: tuple[str, ...] = ()
    pretraining = _pretraining_runs(study)
    if arm in pretraining:  # the arm starts from the pretraining run of its name
        step_name, run_dir = pretraining[arm]
        init_overrides, needs = [f"model.pretrained={run_dir}"], (step_name,)
    common = [
        *study.overrides,
        *study.finetune_overrides,
        f"data.dataset={lesion}",
        f"data.n_folds={study.n_folds}",
        f"data.tuning_fold={study.tuning_fold}",
        f"seed={study.seed}",
        *init_overrides,
    ]
    steps = [
        _training_step(
            f"fine-tune {arm} fold {fold}",
            config_path,
            [*common, f"data.fold={fold}"],
            arm_dir / f"fold{fold}",
            needs,
        )
        for fold in splits.test_folds
    ]
    tuning_dir = arm_dir / "tuning"
    first = splits.test_folds[0]
    tune = f"tune threshold {arm}"
    steps.append(
        Step(
            tune,
            partial(
                _tune,
                arm_dir / f"fold{first}",
                lesion,
                splits.tuning_cases(),
                tuning_dir,
                study.predict_overlap,
            ),
            tuning_dir,
            (f"fine-tune {arm} fold {first}",),
        )
    )
    for fold in splits.test_folds:
        out = arm_dir / "predictions" / f"fold{fold}"
        steps.append(
            Step(
                f"predict {arm} fold {fold}",
                partial(
                    _predict_fold,
                    arm_dir / f"fold{fold}",
                    lesion,
                    splits.test_cases(fold),
                    tuning_dir,
                    out,
                    study.predict_overlap,
                ),
                out,
                (tune, f"fine-tune {arm} fold {fold}"),
            )
        )
    return steps


def _pretraining_runs(study: StudyConfig) -> dict[str, tuple[str, Path]]:
    """Init name -> (step name, run folder) of every pretraining run on the healthy scans."""
    runs = Path(study.runs_dir)
    named = {
        "sap": ("skeleton pretraining", runs / "pretrain"),
        "ssl": ("SSL pretraining", runs / "ssl"),
    }
    for init in study.pretrain_runs:  # e.g. mae: the arm of that name
        named[init] = (f"{init} pretraining", runs / f"pretrain_{init}")
    return named


def _evaluate(study: StudyConfig, arm: str, splits: Splits, lesion: Path) -> Path:
    """Score an arm's test predictions lesion-wise at its tuned threshold."""
    arm_dir = Path(study.runs_dir) / arm
    threshold = load_threshold(arm_dir / "tuning" / THRESHOLD_FILE)
    evaluation = arm_dir / "evaluation"
    result = evaluate_predictions(
        [arm_dir / "predictions" / f"fold{fold}" for fold in splits.test_folds],
        lesion,
        [case for fold in splits.test_folds for case in splits.test_cases(fold)],
        EvaluationSettings(threshold=threshold),
    )
    write_evaluation(result, evaluation)
    return evaluation


def run_study(study: StudyConfig) -> StudyResult:
    """Run every step of the study and write the comparison report.

    One invocation at a time per ``runs_dir`` trains and reports: a second one waits for the
    first (a file lock, taken once the data passed its checks, so a refused study writes
    nothing there) and then reuses the steps it completed, instead of training into the same
    run folders. The cohort, cache and split have locks of their own.
    """
    clock = Clock()
    skeleton, lesion = clock.step("cohort", lambda: _cohort(study))
    splits = clock.step("check, preprocess, split", lambda: _prepare(study, skeleton, lesion))
    with file_lock(Path(study.runs_dir) / STUDY_LOCK):
        return _run_steps_and_report(study, clock, skeleton, lesion, splits)


def _run_steps_and_report(
    study: StudyConfig, clock: Clock, skeleton: Path, lesion: Path, splits: Splits
) -> StudyResult:
    seed = [f"seed={study.seed}"]
    pretraining = _pretraining_runs(study)
    configs = {
        "sap": (study.pretrain_config, study.pretrain_overrides),
        "ssl": (study.ssl_config, study.ssl_overrides),
        **{init: (path, study.ssl_overrides) for init, path in study.pretrain_runs.items()},
    }
    steps = [
        _training_step(
            name,
            configs[init][0],
            [*study.overrides, *configs[init][1], f"data.dataset={skeleton}", *seed],
            run_dir,
            (),
        )
        for init, (name, run_dir) in pretraining.items()
    ]
    for arm, config_path in study.finetune_configs.items():
        steps += _arm_steps(study, arm, config_path, splits, lesion)
    threads = threads_per_worker(study.workers, usable_cpus())
    run_steps(steps, clock, study.workers, threads)
    arms = {
        arm: clock.step(f"evaluate {arm}", partial(_evaluate, study, arm, splits, lesion))
        for arm in study.finetune_configs
    }
    report_dir = Path(study.report_dir)
    evaluations = [load_evaluation(path, name=arm) for arm, path in arms.items()]
    comparison = clock.step(
        "compare", lambda: compare_runs(evaluations, n_resamples=study.n_resamples, seed=study.seed)
    )
    write_comparison(comparison, report_dir, n_resamples=study.n_resamples)
    report = report_dir / "report.md"
    run_threads = threads if study.workers > 1 else None
    header = _study_header(study, splits, comparison, run_threads)
    learning = _learning_section(
        study, pretraining["sap"][1], pretraining["ssl"][1], splits, report_dir
    )
    write_text(report, header + learning + report.read_text())
    write_text(
        report_dir / TIMINGS_FILE,
        f"# Study `{study.name}`: wall time\n\n{clock.describe(study.workers, threads)}\n",
    )
    write_text(report_dir / "study.yaml", to_yaml(study))
    return StudyResult(
        report=report, arms=arms, seconds=clock.seconds, wall_seconds=clock.wall_seconds
    )


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
    study: StudyConfig, pretrain_run: Path, ssl_run: Path, splits: Splits, report_dir: Path
) -> str:
    """Did every network learn? The learning metric of each run, its curves, and the inference
    window validation, tuning and prediction used."""
    named: dict[str, tuple[str, Path]] = {
        "skeleton pretraining": ("skeleton", pretrain_run),
        "SSL pretraining": ("ssl", ssl_run),
    }
    runs = Path(study.runs_dir)
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
            f"Training precision: {_training_precisions(diagnostics)}.",
            "",
            f"Inference window (validation, threshold tuning and prediction alike): {window}.",
            "",
            "",
        ]
    )


def _training_precisions(diagnostics: Sequence[RunDiagnostics]) -> str:
    """The precision every run trained at, or each run's where they differ."""
    words = {
        run.name: describe_precision(run.precision) if run.precision else "not recorded"
        for run in diagnostics
    }
    if len(set(words.values())) == 1:
        return f"{next(iter(words.values()))} (every run)"
    return ", ".join(f"{name} {word}" for name, word in words.items())


def _inference_window(prediction_dir: Path) -> str:
    """The sliding-window size recorded by ``sap predict`` in a prediction folder."""
    try:
        record = read_json(prediction_dir / PREDICTION_JSON)
    except (OSError, ValueError):
        return "not recorded"
    outside = "; voxels outside the body are background" if record.get("body_only") else ""
    precision = describe_precision(record.get("precision") or "32-true")
    return f"{record.get('window')} voxels, overlap {record.get('overlap')}, {precision}{outside}"


def _machine_line(run_threads: int | None = None) -> str:
    """What decides bitwise results besides the seed: the torch version and the CPU threads of
    each run (the thread count changes the order of floating-point sums; ``SAP_NUM_THREADS``
    pins it). ``run_threads``: the worker processes' count, else this process's."""
    import torch

    threads = run_threads or torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} CPU threads per run"


def _study_header(
    study: StudyConfig, splits: Splits, comparison: Comparison, run_threads: int | None = None
) -> str:
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
        f"- Machine: {_machine_line(run_threads)}.",
        "",
        verdict(comparison),
    ]
    return "\n".join(lines) + "\n"
