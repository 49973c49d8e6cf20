"""``sap evaluate`` (lesion-wise evaluation of a prediction folder) and ``sap compare``."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path

from sap_lightning.commands import _args
from sap_lightning.config.schema import ValidationConfig
from sap_lightning.core.errors import SapError
from sap_lightning.core.protocol import BOOTSTRAP_RESAMPLES, CONNECTIVITIES, LARGE_LESION_ML

log = logging.getLogger(__name__)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _case_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _fold(text: str) -> int | str:
    if text == "tuning":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected a fold number or 'tuning', got {text!r}"
        ) from err


def add_arguments_evaluate(parser: argparse.ArgumentParser) -> None:
    from sap_lightning.core.protocol import THRESHOLD_GRID

    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        nargs="+",
        help="sap predict folder(s): masks <case>.nii.gz, probabilities/<case>.nii.gz; several "
        "folders (one per fold model) are evaluated together",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        type=Path,
        help="dataset with labelsTr/ (validated first when it has a dataset.json)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    which = parser.add_argument_group("cases (one of)")
    which.add_argument("--cases", type=_case_list, help="comma-separated case ids")
    which.add_argument("--splits", type=Path, help="splits.json (with --fold)")
    which.add_argument("--fold", type=_fold, help="fold number, or 'tuning' for the tuning fold")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument(
        "--threshold", type=_args.probability, help="probability threshold in (0, 1]"
    )
    threshold.add_argument(
        "--threshold-file", type=Path, help="threshold JSON written by a --tune run"
    )
    threshold.add_argument(
        "--tune",
        action="store_true",
        help="choose the threshold on these cases (median patient F2), "
        "write it to OUT/threshold.json and evaluate with it",
    )
    parser.add_argument(
        "--thresholds",
        type=_float_list,
        default=THRESHOLD_GRID,
        help="FROC / tuning grid, comma-separated (default 0.05,0.10,...,0.95)",
    )
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=CONNECTIVITIES,
        default=ValidationConfig.connectivity,
        help="lesion connectivity (default %(default)s)",
    )
    parser.add_argument(
        "--min-volume-ml",
        type=_args.non_negative_float,
        default=LARGE_LESION_ML,
        help="volume of 'clinically relevant' lesions (default %(default)s mL)",
    )
    parser.add_argument(
        "--no-pictures",
        action="store_true",
        help="skip pictures/<case>.png (b1000 MIPs with true / false positives and misses)",
    )
    parser.add_argument(
        "--tolerance-mm",
        type=_args.positive_float,
        default=ValidationConfig.tolerance_mm,
        help="NSD tolerance in mm (default %(default)s)",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from sap_lightning.dataset.layout import DATASET_JSON
    from sap_lightning.dataset.validate import require_valid_dataset
    from sap_lightning.evaluation.predictions import (
        THRESHOLD_JSON,
        EvaluationSettings,
        evaluate_predictions,
        resolve_cases,
        tune_on_predictions,
        write_evaluation,
    )
    from sap_lightning.evaluation.threshold import load_threshold, save_threshold
    from sap_lightning.metrics.functional import check_thresholds

    if args.fold is not None and args.splits is None:
        raise SapError("--fold needs --splits")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise SapError(f"--threshold must be in (0, 1], got {args.threshold}")
    try:
        grid = tuple(float(t) for t in check_thresholds(args.thresholds))
    except ValueError as err:
        raise SapError(f"--thresholds: {err}") from err
    if (args.dataset / DATASET_JSON).is_file():
        # A dataset is checked whole before anything is read or written: a broken or
        # mislabelled file must stop the evaluation, not skew it. (A bare labelsTr folder has
        # no label set to check against; its files are checked as they are read.)
        require_valid_dataset(args.dataset, task="lesion")  # any foreground is lesion
    predictions = args.predictions[0] if len(args.predictions) == 1 else list(args.predictions)
    cases = resolve_cases(args.dataset, args.cases, args.splits, args.fold, predictions)
    settings = EvaluationSettings(
        threshold=args.threshold,
        thresholds=grid,
        connectivity=args.connectivity,
        min_volume_ml=args.min_volume_ml,
        tolerance_mm=args.tolerance_mm,
    )
    if args.threshold_file is not None:
        settings = replace(settings, threshold=load_threshold(args.threshold_file))

    def progress(case_id: str) -> None:
        log.info("case %s", case_id)

    if args.tune and args.splits is not None and str(args.fold) != "tuning":
        from sap_lightning.cache.splits import load_splits

        tuning_fold = load_splits(args.splits).tuning_fold
        if str(args.fold) != str(tuning_fold):
            raise SapError(
                f"--tune on fold {args.fold}: the threshold is chosen on the tuning fold only "
                f"(--fold tuning or --fold {tuning_fold}), never on a test fold"
            )
    if args.tune:
        choice = tune_on_predictions(predictions, args.dataset, cases, settings, progress)
        path = save_threshold(args.out / THRESHOLD_JSON, choice)
        print(f"tuned threshold {choice.threshold:g} (median F2 {choice.median_f2:.3f}) -> {path}")
        settings = replace(settings, threshold=choice.threshold)

    evaluation = evaluate_predictions(predictions, args.dataset, cases, settings, progress)
    written = write_evaluation(evaluation, args.out)
    pictures = []
    if not args.no_pictures:
        from sap_lightning.evaluation.case_pictures import write_case_pictures

        threshold = evaluation.summary["operating_point"].get("threshold")
        pictures = write_case_pictures(
            predictions, args.dataset, cases, threshold, args.out, args.connectivity
        )
    metrics = evaluation.summary["metrics"]
    suffix = evaluation.summary["settings"]["large_suffix"]

    def show(name: str) -> str:
        value = metrics.get(name)
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else f"{value:.3f}"
        )

    print(
        f"{len(cases)} cases ({evaluation.summary['operating_point']['source']}): "
        f"sensitivity {show('sensitivity')}, precision {show('precision')}, F2 {show('f2')}, "
        f"FP/exam {show('fp_per_exam')}, Dice detected {show('dice_detected')}, "
        f"NSD detected {show('nsd_detected')}, FROC AUC {show('froc_auc')}, "
        f"mean sensitivity{suffix} {show('mean_sensitivity' + suffix)}"
    )
    shown = f" and {len(pictures)} case pictures in pictures/" if pictures else ""
    print(f"wrote {', '.join(p.name for p in written)}{shown} to {args.out}")
    return 0


def add_arguments_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="folders written by sap evaluate")
    parser.add_argument("--names", nargs="+", help="arm names (default: folder names)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--n-resamples",
        type=_args.positive_int,
        default=BOOTSTRAP_RESAMPLES,
        help="bootstrap resamples (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run_compare(args: argparse.Namespace) -> int:
    from sap_lightning.evaluation.report import compare_runs, load_evaluation, write_comparison

    if args.names is not None and len(args.names) != len(args.eval_dirs):
        raise SapError(f"{len(args.names)} names for {len(args.eval_dirs)} evaluation folders")
    names = args.names or [None] * len(args.eval_dirs)
    runs = [load_evaluation(path, name) for path, name in zip(args.eval_dirs, names)]
    comparison = compare_runs(runs, n_resamples=args.n_resamples, seed=args.seed)
    written = write_comparison(comparison, args.out, n_resamples=args.n_resamples)
    print(
        f"compared {', '.join(comparison.names)}: wrote {', '.join(p.name for p in written)} to {args.out}"
    )
    return 0
