"""The whole study in one command (``sap study``, ``make demo``).

Steps, each skipped when its output is already complete, so an interrupted study continues:

1. the synthetic cohort (or ``dataset_root``), checked, cached and split (stratified folds,
   one threshold-tuning fold);
2. the pretraining every listed arm needs (``core/arms.py``: skeleton pretraining for SAP, the
   SSL and MAE pretexts), once each, on the healthy scans;
3. for every arm and every test fold: lesion fine-tuning on the other test folds (never on the
   tuning fold), initialised as the arm says;
4. per arm, the threshold is chosen on the tuning fold with the first fold's model (which never
   saw it) and applied unchanged to every test fold (docs/evaluation.md, the "clean variant");
5. every test patient is predicted by the model of its fold, evaluated lesion-wise, and the arms
   are compared in ``<report_dir>/report.md`` (``evaluation/study_report.py``: header, verdict,
   learning diagnostics; then Table 1, p-values, FROC and box plots).

With ``workers: N`` the steps of 2-5 that do not depend on each other run N at a time, each in
its own process (``pipeline/steps.py``); the report is the same as when they run in turn with
the same torch threads per run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from sap_lightning.cache import preprocess_dataset
from sap_lightning.cache.reader import open_cache
from sap_lightning.cache.splits import Splits, cache_lesion_counts, load_splits, split_dataset
from sap_lightning.config import StudyConfig, load_config, to_yaml
from sap_lightning.core.arms import Arm, get_arm, list_arms
from sap_lightning.core.errors import SapError
from sap_lightning.core.io import file_lock, write_text
from sap_lightning.core.protocol import DEFAULT_THRESHOLD
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.core.threads import usable_cpus
from sap_lightning.dataset import layout
from sap_lightning.dataset.validate import require_valid_dataset
from sap_lightning.evaluation.case_pictures import choose_patients, write_patient_grid
from sap_lightning.evaluation.diagnostics import LESION_LEARNING
from sap_lightning.evaluation.predictions import (
    EvaluationSettings,
    evaluate_predictions,
    tune_on_predictions,
    write_evaluation,
)
from sap_lightning.evaluation.repeats import RepeatResult, write_pooled_report
from sap_lightning.evaluation.report import (
    Comparison,
    compare_runs,
    load_evaluation,
    write_comparison,
)
from sap_lightning.evaluation.study_report import (
    LEARNING_MD,
    PATIENTS_PNG,
    TIMINGS_FILE,
    LearningRun,
    inference_window,
    learning_section,
    patients_section,
    study_header,
)
from sap_lightning.evaluation.threshold import load_threshold, save_threshold
from sap_lightning.inference.predict import THRESHOLD_FILE, Predictor
from sap_lightning.pipeline.reuse import (
    check_cohort,
    check_reuse,
    check_runs_cohort,
    cohort_settings,
    run_settings,
)
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


def _dataset_folders(study: StudyConfig) -> tuple[Path, Path]:
    """The skeleton and lesion datasets' folders (``dataset_root``, or the generated cohort)."""
    root = Path(study.dataset_root) if study.dataset_root else Path(study.data_dir) / "phantoms"
    return root / "skeleton", root / "lesion"


def _cohort(study: StudyConfig) -> tuple[Path, Path]:
    """The skeleton and lesion datasets, generated when the study owns its data."""
    if study.dataset_root:
        root = Path(study.dataset_root)
    else:
        root = Path(study.data_dir) / "phantoms"
        # Two studies started at once on one data_dir: the second waits and reuses the cohort.
        with file_lock(Path(study.data_dir) / COHORT_LOCK):
            if not (root / "lesion" / "dataset.json").is_file():
                make_phantom_cohort(root, workers=study.workers, **cohort_settings(study))
            check_cohort(study, root)
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


def _train(config_path: str, bases: Sequence[str], overrides: Sequence[str], run_dir: Path) -> None:
    """One training run into ``run_dir``: resumed from its last checkpoint when an earlier
    invocation was interrupted, started afresh otherwise."""
    if last_checkpoint_path(run_dir).is_file():
        log.info("resuming interrupted run %s", run_dir)
        extra = [f"run_dir={run_dir}", "resume=true"]
    else:
        extra = [f"run_dir={_fresh(run_dir)}"]
    cfg = load_config(config_path, [*overrides, *extra], extra_files=bases)
    settings = run_settings(cfg)
    result = run_training(cfg)
    if result.interrupted:
        raise SapError(f"training in {run_dir} was interrupted; run the study again to resume")
    mark_done(run_dir, config=config_path, metrics=result.metrics, settings=settings)


def _tune(run: Path, lesion: Path, cases: list[str], tuning_dir: Path, overlap: float) -> None:
    """Predict the tuning fold with one fold model and choose the arm's threshold on it."""
    # Masks unused: tuning reads the probabilities.
    predictor = Predictor(
        run, threshold=DEFAULT_THRESHOLD, overlap=overlap, progress=False, pictures=False
    )
    # The dataset was checked in _prepare.
    predictor.predict(lesion, _fresh(tuning_dir), case_ids=cases, validate_input=False)
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
    # The report draws the patients it shows (_draw_patients); the folders skip pictures.
    predictor = Predictor(run, threshold=threshold, overlap=overlap, progress=False, pictures=False)
    predictor.predict(lesion, _fresh(out), case_ids=cases, validate_input=False)
    mark_done(out, threshold=threshold)


def _training_step(
    name: str,
    study: StudyConfig,
    config_path: str,
    overrides: Sequence[str],
    run_dir: Path,
    needs: tuple[str, ...],
) -> Step:
    action = partial(_train, config_path, list(study.bases), list(overrides), run_dir)
    check = partial(check_reuse, name, config_path, list(study.bases), list(overrides), run_dir)
    return Step(name, action, run_dir, needs, check)


def experiment_file(study: StudyConfig, name: str) -> str:
    """``<profile>/<name>.yaml``: an arm's experiment file in the study's profile folder."""
    return f"{study.profile.rstrip('/')}/{name}.yaml"


@dataclass(frozen=True)
class PretrainingRun:
    """A pretraining run of the study: the arm it serves, its step and folder."""

    arm: Arm
    step: str
    run_dir: Path
    config: str


def pretraining_runs(study: StudyConfig) -> list[PretrainingRun]:
    """The pretraining run of every listed arm that needs one, in registration order (SAP's
    skeleton pretraining first), each in ``<runs_dir>/<its experiment name>``."""
    runs = []
    for name in list_arms():
        arm = get_arm(name)
        if name in study.arms and arm.pretraining is not None:
            experiment = arm.pretraining.experiment
            runs.append(
                PretrainingRun(
                    arm,
                    arm.pretraining.title,
                    Path(study.runs_dir) / experiment,
                    experiment_file(study, experiment),
                )
            )
    return runs


def _pretraining_steps(study: StudyConfig, skeleton: Path) -> list[Step]:
    return [
        _training_step(
            run.step,
            study,
            run.config,
            [
                *study.overrides,
                *study.pretraining_overrides.get(run.arm.name, []),
                f"data.dataset={skeleton}",
                f"seed={study.seed}",
            ],
            run.run_dir,
            (),
        )
        for run in pretraining_runs(study)
    ]


def _arm_steps(study: StudyConfig, arm: str, splits: Splits, lesion: Path) -> list[Step]:
    """Fine-tune one arm on every test fold, tune its threshold on the tuning fold with the
    first fold's model, and predict each test fold with its own model."""
    arm_dir = Path(study.runs_dir) / arm
    init_overrides = []
    needs: tuple[str, ...] = ()
    source = {run.arm.name: run for run in pretraining_runs(study)}.get(arm)
    if source is not None:  # the arm starts from its pretraining run
        init_overrides, needs = [f"model.pretrained={source.run_dir}"], (source.step,)
    common = [
        *study.overrides,
        *study.finetune_overrides.get(arm, []),
        f"data.dataset={lesion}",
        f"data.n_folds={study.n_folds}",
        f"data.tuning_fold={study.tuning_fold}",
        f"seed={study.seed}",
        *init_overrides,
    ]
    config_path = experiment_file(study, get_arm(arm).finetune_experiment)
    steps = [
        _training_step(
            f"fine-tune {arm} fold {fold}",
            study,
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
    """Run every step of the study and write the comparison report (with ``repeats`` > 1,
    every repeat's and the pooled one: :func:`run_repeats`).

    One invocation at a time per ``runs_dir`` trains and reports: a second one waits for the
    first (a file lock, taken once the data passed its checks, so a refused study writes
    nothing there) and then reuses the steps it completed, instead of training into the same
    run folders. The cohort, cache and split have locks of their own.
    """
    if study.repeats > 1:
        return run_repeats(study)
    clock = Clock()
    skeleton, lesion = clock.step("cohort", lambda: _cohort(study))
    splits = clock.step("check, preprocess, split", lambda: _prepare(study, skeleton, lesion))
    with file_lock(Path(study.runs_dir) / STUDY_LOCK):
        check_runs_cohort(study, lesion)
        return _run_steps_and_report(study, clock, skeleton, lesion, splits)


def _run_steps_and_report(
    study: StudyConfig, clock: Clock, skeleton: Path, lesion: Path, splits: Splits
) -> StudyResult:
    steps = _pretraining_steps(study, skeleton)
    for arm in study.arms:
        steps += _arm_steps(study, arm, splits, lesion)
    if study.stage == "training":  # no test fold predicted (docs/protocol.md)
        training = {run.step for run in pretraining_runs(study)}
        steps = [s for s in steps if s.name in training or s.name.startswith("fine-tune ")]
    threads = threads_per_worker(study.workers, usable_cpus())
    run_steps(steps, clock, study.workers, threads)
    if study.stage == "training":
        return _report_training(study, clock, splits, threads)
    arms = {
        arm: clock.step(f"evaluate {arm}", partial(_evaluate, study, arm, splits, lesion))
        for arm in study.arms
    }
    report_dir = Path(study.report_dir)
    evaluations = [load_evaluation(path, name=arm) for arm, path in arms.items()]
    comparison = clock.step(
        "compare", lambda: compare_runs(evaluations, n_resamples=study.n_resamples, seed=study.seed)
    )
    write_comparison(comparison, report_dir, n_resamples=study.n_resamples)
    report = report_dir / "report.md"
    header = study_header(
        study,
        splits,
        comparison,
        pretraining_files=[
            (run.arm.pretraining.label, run.config) for run in pretraining_runs(study)
        ],  # type: ignore[union-attr]
        arm_files=[
            (arm, experiment_file(study, get_arm(arm).finetune_experiment)) for arm in study.arms
        ],
        run_threads=threads if study.workers > 1 else None,
    )
    learning = learning_section(
        _learning_runs(study, splits),
        report_dir,
        inference_window(Path(study.runs_dir) / study.arms[0] / "tuning"),
    )
    patients = clock.step(
        "draw patients", partial(_draw_patients, study, splits, lesion, comparison)
    )
    write_text(report, header + learning + patients + report.read_text())
    write_text(
        report_dir / TIMINGS_FILE,
        f"# Study `{study.name}`: wall time\n\n{clock.describe(study.workers, threads)}\n",
    )
    write_text(report_dir / "study.yaml", to_yaml(study))
    return StudyResult(
        report=report, arms=arms, seconds=clock.seconds, wall_seconds=clock.wall_seconds
    )


def _draw_patients(study: StudyConfig, splits: Splits, lesion: Path, comparison: Comparison) -> str:
    """Every arm's MIPs of the baseline's best, median and worst test patient (the report's
    "What each arm found"); the baseline is ``scratch`` when listed, else the first arm."""
    baseline = "scratch" if "scratch" in study.arms else study.arms[0]
    runs = {run.name: run for run in comparison.runs}
    patients = choose_patients(runs[baseline].cases)
    arms = {
        arm: (
            [
                Path(study.runs_dir) / arm / "predictions" / f"fold{fold}"
                for fold in splits.test_folds
            ],
            load_threshold(Path(study.runs_dir) / arm / "tuning" / THRESHOLD_FILE),
        )
        for arm in study.arms
    }
    if patients:
        write_patient_grid(arms, lesion, patients, Path(study.report_dir) / PATIENTS_PNG)
    return patients_section(comparison, patients, baseline)


def _report_training(study: StudyConfig, clock: Clock, splits: Splits, threads: int) -> StudyResult:
    """``stage: training``: the learning section alone, in ``<report_dir>/learning.md``."""
    report_dir = Path(study.report_dir)
    learning = learning_section(
        _learning_runs(study, splits), report_dir, "not run yet (stage: training)"
    )
    report = report_dir / LEARNING_MD
    write_text(
        report,
        f"# Study `{study.name}`: training only (no test fold predicted)\n\n{learning}",
    )
    write_text(
        report_dir / TIMINGS_FILE,
        f"# Study `{study.name}`: wall time\n\n{clock.describe(study.workers, threads)}\n",
    )
    return StudyResult(report=report, seconds=clock.seconds, wall_seconds=clock.wall_seconds)


def repeat_config(study: StudyConfig, repeat: int) -> StudyConfig:
    """Repeat ``repeat`` of a study: seed ``seed + repeat`` for cohort, splits and networks;
    repeat 0 in the study's own folders, the others in ``<folder>_repeat<r>``."""

    def folder(path: str) -> str:
        return path if repeat == 0 else f"{path.rstrip('/')}_repeat{repeat}"

    return replace(
        study,
        seed=study.seed + repeat,
        data_dir=folder(study.data_dir),
        runs_dir=folder(study.runs_dir),
        report_dir=folder(study.report_dir),
        repeats=1,
    )


def run_repeats(study: StudyConfig) -> StudyResult:
    """Every repeat in turn (each resumable, reusing its completed steps), then the pooled
    report in ``<report_dir>_repeats/report.md`` (``evaluation/repeats.py``)."""
    repeats = [repeat_config(study, r) for r in range(study.repeats)]
    results = [run_study(config) for config in repeats]
    if study.stage == "training":
        return results[-1]
    out = Path(f"{study.report_dir.rstrip('/')}_repeats")
    report = write_pooled_report(
        study,
        [
            RepeatResult(
                r,
                config,
                {arm: Path(config.runs_dir) / arm / "evaluation" for arm in config.arms},
                _learning_runs(config, _load_splits(config)),
                results[r].report,
            )
            for r, config in enumerate(repeats)
        ],
        out,
    )
    return StudyResult(
        report=report,
        seconds={f"repeat {r}": result.wall_seconds for r, result in enumerate(results)},
        wall_seconds=sum(result.wall_seconds for result in results),
    )


def _load_splits(study: StudyConfig) -> Splits:
    _, lesion = _dataset_folders(study)
    return load_splits(layout.default_splits_path(lesion))


def _learning_runs(study: StudyConfig, splits: Splits) -> list[LearningRun]:
    """Every training run of the study with the terms that show it learned: each pretraining
    (its arm's terms), then every fine-tune."""
    runs = [
        LearningRun(run.step, run.arm.pretraining.learning, run.run_dir)  # type: ignore[union-attr]
        for run in pretraining_runs(study)
    ]
    for arm in study.arms:
        for fold in splits.test_folds:
            run_dir = Path(study.runs_dir) / arm / f"fold{fold}"
            runs.append(LearningRun(f"{arm} fold {fold}", LESION_LEARNING, run_dir))
    return runs
