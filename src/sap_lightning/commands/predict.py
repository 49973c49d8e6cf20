"""``sap predict``: whole-volume inference with a lesion table and burden report per case."""

from __future__ import annotations

import argparse

from sap_lightning.commands import _args
from sap_lightning.config.schema import ValidationConfig
from sap_lightning.core.precision import AUTOCAST_PRECISIONS


def add_arguments_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="lesion run folder, Lightning checkpoint or exported backbone",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="dataset folder (dataset.json) or folder of <case>_0000.nii.gz files",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--skeleton-checkpoint",
        default=None,
        help="skeleton run/checkpoint: adds the skeleton map and regions",
    )
    parser.add_argument(
        "--threshold",
        type=_args.probability,
        default=None,
        help="probability threshold (default: <run>/threshold.json, as written by "
        "sap evaluate --tune on the tuning fold; else 0.5 with a warning)",
    )
    parser.add_argument(
        "--device",
        type=_args.device,
        default=None,
        help="torch device (default: cuda if available)",
    )
    parser.add_argument(
        "--roi-size",
        type=_args.positive_int,
        nargs=3,
        default=None,
        help="sliding-window size (default: the run's validation window)",
    )
    parser.add_argument(
        "--sw-batch-size",
        type=_args.positive_int,
        default=None,
        help="windows per forward pass (default: the run's validation.sw_batch_size, as "
        "recorded in its checkpoint)",
    )
    parser.add_argument(
        "--overlap", type=_args.unit_interval_open, default=ValidationConfig.overlap
    )
    parser.add_argument(
        "--precision",
        choices=list(AUTOCAST_PRECISIONS),
        default=None,
        help="inference precision (default: the run's validation.precision, as recorded in "
        "its checkpoint)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--no-pictures",
        action="store_true",
        help="skip each case's <case>_mip.png (coronal and sagittal b1000 MIPs with the lesions)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="clear another model's predictions from --out first (only files sap predict "
        "writes; without it such a folder is refused)",
    )


def run_predict(args: argparse.Namespace) -> int:
    from sap_lightning.inference.predict import Predictor  # torch only when predicting

    predictor = Predictor(
        args.checkpoint,
        skeleton_checkpoint=args.skeleton_checkpoint,
        threshold=args.threshold,
        roi_size=args.roi_size,
        device=args.device,
        sw_batch_size=args.sw_batch_size,
        overlap=args.overlap,
        precision=args.precision,
        progress=not args.no_progress,
        pictures=not args.no_pictures,
    )
    summaries = predictor.predict(args.input, args.out, overwrite=args.overwrite)
    total = sum(s["lesions"] for s in summaries)
    print(f"predicted {len(summaries)} cases ({total} lesions) into {args.out}")
    return 0
