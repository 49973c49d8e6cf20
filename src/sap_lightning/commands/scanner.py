"""``sap import-dicom``: scanner DICOM exams to T1 + b1000 (+ ADC) images on one grid."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sap_lightning.commands import _args
from sap_lightning.core.errors import DatasetError


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({err})") from err
    return text


def add_arguments_import_dicom(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Turn scanner DICOM exams (SRC/<case>/..., any file names and nesting) into T1 + b1000 "
        "images on the T1 grid: series sorted by position, DWI split by b-value, stations "
        "composed with linear ramps and intensity-standardised. With --labels OUT is an nnU-Net "
        "raw dataset, else a folder for sap predict; OUT/manifests/<case>.json records every "
        "decision (docs/scanner.md)."
    )
    parser.add_argument("src", type=Path, help="folder of exam folders <case>/ (DICOM files)")
    parser.add_argument(
        "out",
        type=Path,
        help="output folder: new, empty, or an earlier import-dicom output with the same channels",
    )
    parser.add_argument(
        "--t1",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="SeriesDescription pattern of the T1 series (default: every non-DWI volume series)",
    )
    parser.add_argument(
        "--dwi",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="SeriesDescription pattern of the DWI series (default: every series with b-values)",
    )
    parser.add_argument(
        "--b-value",
        type=_args.positive_float,
        default=1000.0,
        help="the DWI channel is the b-value nearest this, s/mm^2 (default %(default)g)",
    )
    parser.add_argument(
        "--adc",
        action="store_true",
        help="add an ADC channel (10^-3 mm^2/s; log-linear fit over all b-values per station)",
    )
    parser.add_argument(
        "--n4",
        action="store_true",
        help="N4 bias-field correction per station inside a body mask (DWI: one field per "
        "station from its lowest b-value)",
    )
    parser.add_argument(
        "--register",
        nargs="?",
        const="rigid",
        choices=("rigid", "translation"),
        default=None,
        help="register each DWI station to the composed T1 first (default kind: rigid)",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="DIR",
        help="annotations DIR/<case>.nii.gz in world space, resampled to the T1 grid (nearest "
        "neighbour); makes OUT an nnU-Net raw dataset",
    )
    parser.add_argument(
        "--label-set",
        default="lesion",
        help="with --labels: 'lesion', 'skeleton' or a JSON file {name: value} (default: lesion)",
    )


def run_import_dicom(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from sap_lightning.core.threads import choose_threads
    from sap_lightning.scanner.importer import ImportOptions, import_dicom

    # The count torch would get here (core.threads), without importing torch: a data command.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(choose_threads(pool="SimpleITK"))
    options = ImportOptions(
        t1=args.t1,
        dwi=args.dwi,
        b_value=args.b_value,
        adc=args.adc,
        n4=args.n4,
        register=args.register,
        labels=args.labels,
        label_set=args.label_set,
    )
    report = import_dicom(args.src, args.out, options)
    b_values = sorted(set(report.b_values.values()))
    used = f", b={'/'.join(f'{b:g}' for b in b_values)}" if b_values else ""
    channels = " + ".join(options.channels)
    if report.imported:
        nxt = (
            f"sap check-data {report.out}"
            if report.kind == "dataset"
            else f"sap predict --input {report.out}"
        )
        print(
            f"imported {len(report.imported)} case(s) ({channels}{used}) into {report.out}; "
            f"manifests in {report.out / 'manifests'}; next: {nxt}"
        )
    if report.refused:
        total = len(report.imported) + len(report.refused)
        raise DatasetError(
            f"{len(report.refused)} of {total} case(s) refused:\n  " + "\n  ".join(report.refused)
            if len(report.refused) > 1
            else report.refused[0]
        )
    return 0
