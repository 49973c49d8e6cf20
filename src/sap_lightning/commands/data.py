"""Data commands: ``import-folder``, ``check-data``, ``preprocess`` and ``split``.

Each imports what it runs inside its own function, so ``sap <command> --help`` and the other
commands do not pay for it (the configuration schema, the cache builder's scipy and SimpleITK),
and none of them imports torch (``tests/integration/test_startup_imports.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sap_lightning.commands import _args
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.protocol import CONNECTIVITIES, DEFAULT_CONNECTIVITY

if TYPE_CHECKING:
    from sap_lightning.config.schema import DataConfig


def _add_task_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("lesion", "skeleton"),
        default=None,
        help="what the labels are for, when the label set does not say (default: one foreground "
        "label is a lesion dataset, the 10-class skeleton set a skeleton dataset). lesion: every "
        "foreground label (e.g. lytic and blastic) is merged into one lesion class",
    )


# --------------------------------------------------------------------------- import-folder


def add_arguments_import_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder of case folders <case>/T1.nii.gz, ...")
    parser.add_argument("out", type=Path, help="new dataset folder (must not exist or be empty)")
    parser.add_argument(
        "--labels",
        default="lesion",
        help="'lesion', 'skeleton' or a JSON file {name: value} (default: lesion)",
    )
    parser.add_argument(
        "--label-name",
        default=None,
        help="label file name in each case folder, without ending "
        "(default: 'lesions' for lesion, 'skeleton' for skeleton, else 'label')",
    )
    parser.add_argument(
        "--subjects", type=Path, default=None, help="JSON file {case_id: subject_id}"
    )
    parser.add_argument(
        "--no-labels", action="store_true", help="allow cases without a label (inference data)"
    )


def _read_subjects(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        subjects = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable subjects file ({err})") from err
    if not isinstance(subjects, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in subjects.items()
    ):
        raise DatasetError(f"{path}: subjects must be a JSON object {{case_id: subject_id}}")
    return subjects


def run_import_folder(args: argparse.Namespace) -> int:
    from sap_lightning.dataset import layout
    from sap_lightning.dataset.import_folder import import_folder

    info = import_folder(
        args.src,
        args.out,
        labels=args.labels,
        label_name=args.label_name,
        subjects=_read_subjects(args.subjects),
        require_labels=not args.no_labels,
    )
    labelled = sum(case.label is not None for case in info.cases)
    task = layout.task_of_labels(info.labels)
    task_text = f"task {task}" if task else "task not implied by the labels: use --task"
    print(
        f"imported {len(info.cases)} cases ({labelled} labelled, {task_text}) into "
        f"{info.root}; next: sap check-data {info.root}"
    )
    return 0


# --------------------------------------------------------------------------- check-data


def add_arguments_check_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    parser.add_argument(
        "--no-labels", action="store_true", help="do not require a label for every case"
    )
    parser.add_argument(
        "--workers", type=_args.positive_int, default=1, help="processes reading files (default 1)"
    )
    _add_task_argument(parser)


def run_check_data(args: argparse.Namespace) -> int:
    """Print every problem, one per line; exit status 1 when there is any."""
    from sap_lightning.dataset.info import load_dataset
    from sap_lightning.dataset.validate import check_dataset

    problems = check_dataset(
        args.dataset, require_labels=not args.no_labels, workers=args.workers, task=args.task
    )
    if problems:
        for problem in problems:
            print(problem)
        print(f"{args.dataset}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    info = load_dataset(args.dataset, task=args.task)
    subjects = len(set(info.subjects.values()))
    try:
        task = f"task {info.task}"
        if info.task == "lesion" and len(info.task_labels) < len(info.labels):
            task += " (foreground labels merged into one lesion class)"
    except DatasetError:  # --no-labels on a label set that does not say: nothing needs it here
        task = "task undecided (the label set does not say; pass --task to train on it)"
    if info.ignore_value is not None:
        task += f", label 'ignore' = {info.ignore_value} (left out of loss, patches and metrics)"
    print(
        f"{info.root}: OK: {len(info.cases)} cases of {subjects} subjects, {task}, "
        f"channels {', '.join(info.channel_names)}, files {info.file_ending}"
    )
    return 0


# --------------------------------------------------------------------------- preprocess


def add_arguments_preprocess(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache folder (default DATASET/../cache/<dataset name>, where training looks)",
    )
    parser.add_argument(
        "--target-spacing",
        type=_args.positive_float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="resample to this spacing in mm (array axis order); default: keep the native grid",
    )
    parser.add_argument(
        "--workers",
        type=_args.positive_int,
        default=1,
        help="processes (default 1; memory grows with each: one whole-body case per process)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every case")
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=(6, 18, 26),
        default=6,
        help="lesion connectivity for the per-lesion metadata (default 6)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the class-location sub-sampling"
    )
    _add_task_argument(parser)


def run_preprocess(args: argparse.Namespace) -> int:
    from sap_lightning.cache import PreprocessParams, preprocess_dataset
    from sap_lightning.dataset.layout import default_cache_path

    params = PreprocessParams(
        target_spacing=tuple(args.target_spacing) if args.target_spacing else None,
        connectivity=args.connectivity,
        seed=args.seed,
    )

    out = args.out if args.out is not None else default_cache_path(args.dataset)
    report = preprocess_dataset(
        args.dataset, out, params, workers=args.workers, force=args.force, task=args.task
    )
    removed = f", {len(report.removed)} removed" if report.removed else ""
    print(
        f"cache {report.cache_root}: {len(report.written)} cases written, "
        f"{len(report.skipped)} up to date (skipped){removed}"
    )
    return 0


# --------------------------------------------------------------------------- split


def add_arguments_split(parser: argparse.ArgumentParser) -> None:
    from sap_lightning.config.schema import DataConfig

    parser.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    # Defaults come from the config schema, so `sap split` and training's own split agree.
    data = DataConfig()
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help=f"lesion datasets: folds (default {data.n_folds}, data.n_folds)",
    )
    parser.add_argument(
        "--tuning-fold",
        type=int,
        default=None,
        help=f"lesion datasets: threshold-tuning fold (default {data.tuning_fold}, "
        "data.tuning_fold)",
    )
    parser.add_argument(
        "--seed", type=int, default=data.split_seed, help="seed (default %(default)s)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=data.val_fraction,
        help="skeleton datasets: fraction of scans for validation (default %(default)s)",
    )
    parser.add_argument(
        "--connectivity",
        type=int,
        choices=CONNECTIVITIES,
        default=DEFAULT_CONNECTIVITY,
        help="lesion connectivity for the counts used to stratify (default %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output file (default DATASET/splits.json)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing different splits file"
    )
    _add_task_argument(parser)
    parser.add_argument(
        "--from-nnunet",
        type=Path,
        default=None,
        metavar="SPLITS_FINAL_JSON",
        help="take the folds from nnU-Net's splits_final.json (fold k's val cases become fold k, "
        "--tuning-fold picks the tuning fold) instead of making them",
    )


def _run_split_from_nnunet(args: argparse.Namespace, data: DataConfig) -> int:
    from sap_lightning.cache.nnunet_splits import split_from_nnunet

    if args.folds is not None:
        raise DatasetError("--folds: with --from-nnunet the folds are nnU-Net's; drop --folds")
    path, splits, written = split_from_nnunet(
        args.dataset,
        args.from_nnunet,
        tuning_fold=data.tuning_fold if args.tuning_fold is None else args.tuning_fold,
        out=args.out,
        force=args.force,
        task=args.task,
    )
    sizes = "/".join(str(len(fold)) for fold in splits.folds)
    print(
        f"{path} {'written' if written else 'unchanged'}: {splits.n_folds} folds of {sizes} "
        f"cases from {args.from_nnunet}, tuning fold {splits.tuning_fold}"
    )
    return 0


def run_split(args: argparse.Namespace) -> int:
    from sap_lightning.cache.splits import split_dataset
    from sap_lightning.config.schema import DataConfig

    data = DataConfig()
    if args.from_nnunet is not None:
        return _run_split_from_nnunet(args, data)
    path, splits, written = split_dataset(
        args.dataset,
        n_folds=data.n_folds if args.folds is None else args.folds,
        tuning_fold=data.tuning_fold if args.tuning_fold is None else args.tuning_fold,
        seed=args.seed,
        val_fraction=args.val_fraction,
        out=args.out,
        connectivity=args.connectivity,
        force=args.force,
        task=args.task,
    )
    if splits.task != "lesion" and (args.folds is not None or args.tuning_fold is not None):
        print(
            f"{args.dataset}: a skeleton dataset gets a train/validation split, not folds: "
            "--folds/--tuning-fold ignored (pass --task lesion for lesion folds)"
        )
    state = "written" if written else "unchanged"
    if splits.task == "lesion":
        sizes = "/".join(str(len(fold)) for fold in splits.folds)
        print(
            f"{path} {state}: {splits.n_folds} folds of {sizes} cases, tuning fold "
            f"{splits.tuning_fold}"
        )
    else:
        print(f"{path} {state}: {len(splits.train)} train / {len(splits.val)} val cases")
    return 0
