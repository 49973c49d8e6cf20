"""Data commands: ``import-folder``, ``check-data``, ``preprocess`` and ``split``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sap_lightning.config.schema import DataConfig
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.lesions import CONNECTIVITIES, DEFAULT_CONNECTIVITY


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    print(
        f"imported {len(info.cases)} cases ({labelled} labelled, task {info.task}) into "
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
        "--workers", type=_positive_int, default=1, help="processes reading files (default 1)"
    )


def run_check_data(args: argparse.Namespace) -> int:
    """Print every problem, one per line; exit status 1 when there is any."""
    from sap_lightning.dataset.validate import check_dataset, load_dataset

    problems = check_dataset(args.dataset, require_labels=not args.no_labels, workers=args.workers)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{args.dataset}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    info = load_dataset(args.dataset)
    subjects = len(set(info.subjects.values()))
    print(
        f"{info.root}: OK: {len(info.cases)} cases of {subjects} subjects, task {info.task}, "
        f"channels {', '.join(info.channel_names)}"
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
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="resample to this spacing in mm (array axis order); default: keep the native grid",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
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


def run_preprocess(args: argparse.Namespace) -> int:
    from sap_lightning.cache import PreprocessParams, preprocess_dataset

    params = PreprocessParams(
        target_spacing=tuple(args.target_spacing) if args.target_spacing else None,
        connectivity=args.connectivity,
        seed=args.seed,
    )
    from sap_lightning.dataset.layout import default_cache_path

    out = args.out if args.out is not None else default_cache_path(args.dataset)
    report = preprocess_dataset(args.dataset, out, params, workers=args.workers, force=args.force)
    removed = f", {len(report.removed)} removed" if report.removed else ""
    print(
        f"cache {report.cache_root}: {len(report.written)} cases written, "
        f"{len(report.skipped)} up to date (skipped){removed}"
    )
    return 0


# --------------------------------------------------------------------------- split


def add_arguments_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw layout)")
    # Defaults come from the config schema, so `sap split` and training's own split agree.
    data = DataConfig()
    parser.add_argument(
        "--folds",
        type=int,
        default=data.n_folds,
        help="lesion datasets: folds (default %(default)s, data.n_folds)",
    )
    parser.add_argument(
        "--tuning-fold",
        type=int,
        default=data.tuning_fold,
        help="lesion datasets: threshold-tuning fold (default %(default)s, data.tuning_fold)",
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


def run_split(args: argparse.Namespace) -> int:
    from sap_lightning.cache.splits import split_dataset

    path, splits, written = split_dataset(
        args.dataset,
        n_folds=args.folds,
        tuning_fold=args.tuning_fold,
        seed=args.seed,
        val_fraction=args.val_fraction,
        out=args.out,
        connectivity=args.connectivity,
        force=args.force,
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
