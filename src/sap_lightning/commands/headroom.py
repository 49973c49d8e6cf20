"""``sap headroom``: how hard a synthetic lesion dataset is for a fixed intensity rule (no
training), at one or several mimic densities."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sap_lightning.commands._args import non_negative_float, positive_int

log = logging.getLogger(__name__)


def add_arguments_headroom(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score a fixed intensity rule (normalised b1000 above a threshold and T1 below one, "
        "inside the body) on phantom lesion datasets, with and without the true bone mask, "
        "with the library's preprocessing and lesion-wise metrics: median F2, sensitivity, "
        "false positives per exam split by tissue, lesion contrast-to-noise. One rule is fixed "
        "(b1000 > 0.9, T1 < 0.25), one is tuned on the dataset's tuning fold; both are scored on "
        "the other folds. Give lesion datasets, or --generate OUT to make one cohort per "
        "--mimics value first (docs/cohort.md). Writes headroom.md and headroom.json to --out."
    )
    parser.add_argument(
        "datasets",
        nargs="*",
        type=Path,
        metavar="DATASET",
        help="phantom lesion datasets (with tissuesTr/)",
    )
    parser.add_argument(
        "--generate",
        type=Path,
        metavar="OUT",
        help="generate a cohort per --mimics value into OUT/mimics_<x> (kept when it exists with "
        "the same settings) and analyse its lesion dataset",
    )
    parser.add_argument(
        "--mimics",
        type=non_negative_float,
        nargs="+",
        default=[0.0, 0.5, 1.0, 2.0],
        metavar="X",
        help="mimic densities to generate (default: 0 0.5 1 2)",
    )
    parser.add_argument("--healthy", type=positive_int, default=10, help="healthy scans (10)")
    parser.add_argument("--patients", type=positive_int, default=30, help="patients (30)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument(
        "--size", default=None, help="grid preset (tiny, small, medium, large; default small)"
    )
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"))
    parser.add_argument("--workers", type=positive_int, default=1, help="generation processes")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for headroom.md and headroom.json (default: OUT of --generate)",
    )


def _cohort(out: Path, mimics: float, args: argparse.Namespace) -> Path:
    """The lesion dataset at ``mimics``: reused when it is this generator's cohort for these
    settings, else generated."""
    from sap_lightning import synthetic as phantom

    shape, spacing = phantom.resolve_grid(args.size, args.shape, args.spacing)
    root = out / f"mimics_{mimics:g}"
    start = time.perf_counter()
    reused = phantom.ensure_phantom_cohort(
        root,
        args.healthy,
        args.patients,
        seed=args.seed,
        shape=shape,
        spacing=spacing,
        workers=args.workers,
        mimics=mimics,
    )
    if reused:
        print(f"{root}: reusing the cohort (same settings)")
    else:
        print(f"{root}: generated in {time.perf_counter() - start:.1f} s")
    return root / "lesion"


def run_headroom(args: argparse.Namespace) -> int:
    from sap_lightning.core.errors import ConfigError
    from sap_lightning.core.io import write_json, write_text
    from sap_lightning.evaluation.headroom import FIXED_RULE, analyse, markdown

    if bool(args.datasets) == (args.generate is not None):
        raise ConfigError("give lesion datasets or --generate OUT (one of them)")
    out = args.out or args.generate
    if out is None:
        raise ConfigError("--out is needed when datasets are given")
    datasets = list(args.datasets)
    if args.generate is not None:
        datasets = [_cohort(args.generate, float(m), args) for m in args.mimics]
    start = time.perf_counter()
    results = [analyse(dataset) for dataset in datasets]
    table = markdown(results)
    fixed = f"b1000 > {FIXED_RULE[0]:g}, T1 < {FIXED_RULE[1]:g}"
    text = (
        "# Headroom of a fixed intensity rule\n\n"
        f"Fixed rule: {fixed}; tuned rule: the grid's best median F2 on each dataset's tuning "
        "fold. Scored on the other folds (lesion-wise, any overlap, 6-connected), after the "
        "library's normalisation, inside the body mask; 'bone mask' keeps only the true bone. "
        "FP per exam by the tissue most of a false positive's voxels are. Lesion CNR: "
        "(median lesion - median marrow around it) / noise sigma, normalised b1000.\n\n" + table
    )
    write_text(Path(out) / "headroom.md", text)
    write_json(Path(out) / "headroom.json", {"fixed_rule": list(FIXED_RULE), "results": results})
    print(table, end="")
    print(f"{Path(out) / 'headroom.md'} and headroom.json ({time.perf_counter() - start:.1f} s)")
    return 0
