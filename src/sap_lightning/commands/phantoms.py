"""``sap make-phantoms``: write the synthetic WB-MRI cohort (healthy scans + patients)."""

from __future__ import annotations

import argparse
import time

from sap_lightning import synthetic as phantom
from sap_lightning.commands._args import non_negative_float
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout


def add_arguments_make_phantoms(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate the synthetic whole-body MRI cohort: OUT/skeleton (healthy volunteers, 1-3 "
        "scans each, 10-class skeleton labels) and OUT/lesion (patients, bone-metastasis masks, "
        "skeleton maps in skeletonTr), in the nnU-Net v2 raw format, each with its tissue maps "
        "(tissuesTr, tissues.json; docs/cohort.md). The same seed always gives the same images. "
        "Existing OUT/skeleton and OUT/lesion are only replaced with --overwrite; nothing else "
        "in OUT is touched."
    )
    parser.add_argument("out", metavar="OUT", help="folder to write the two datasets into")
    parser.add_argument(
        "--healthy",
        type=int,
        default=phantom.DEFAULT_HEALTHY,
        metavar="N",
        help="number of healthy scans (default %(default)s)",
    )
    parser.add_argument(
        "--patients",
        type=int,
        default=phantom.DEFAULT_PATIENTS,
        metavar="M",
        help="number of patients (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    sizes = ", ".join(
        f"{name}: {'x'.join(map(str, shape))} voxels at {'x'.join(f'{s:g}' for s in spacing)} mm"
        for name, (shape, spacing) in phantom.SIZES.items()
    )
    parser.add_argument(
        "--size",
        choices=sorted(phantom.SIZES),
        default=None,
        help=f"grid preset ({sizes}); default {phantom.DEFAULT_SIZE}",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="explicit grid in voxels (X left-right, Y anterior-posterior, Z head-foot); "
        "needs --spacing, excludes --size",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("SX", "SY", "SZ"),
        help="voxel spacing in mm, with --shape",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing OUT/skeleton and OUT/lesion datasets",
    )
    existing.add_argument(
        "--reuse",
        action="store_true",
        help="keep existing OUT/skeleton and OUT/lesion when this version of the generator "
        "drew them with these settings; otherwise generate them (replacing the others)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes generating cases in parallel (default %(default)s)",
    )
    parser.add_argument(
        "--mimics",
        type=non_negative_float,
        default=phantom.DEFAULT_MIMICS,
        metavar="X",
        help="scale the prevalence of every lesion mimic of docs/cohort.md (ganglia, nodes, "
        "haemangiomas, Modic changes, ...): 0 none, 1 the table (default), 2 twice",
    )


def run_make_phantoms(args: argparse.Namespace) -> int:
    shape, spacing = phantom.resolve_grid(args.size, args.shape, args.spacing)
    start = time.perf_counter()
    settings = {
        "n_healthy": args.healthy,
        "n_patients": args.patients,
        "seed": args.seed,
        "shape": shape,
        "spacing": spacing,
        "workers": args.workers,
        "mimics": args.mimics,
    }
    if args.reuse:
        if phantom.ensure_phantom_cohort(args.out, **settings):
            print(f"{args.out}: reusing the cohort (this generator, the same settings)")
        paths = phantom.CohortPaths.of(args.out)
    else:
        paths = phantom.make_phantom_cohort(args.out, overwrite=args.overwrite, **settings)
    elapsed = time.perf_counter() - start
    skeleton = read_json(paths.skeleton / layout.DATASET_JSON)
    lesion = read_json(paths.lesion / layout.DATASET_JSON)
    volumes = [v for case in lesion["phantom"]["lesion_volumes_ml"].values() for v in case]
    n_large = sum(v >= 1.0 for v in volumes)
    grid = f"{'x'.join(map(str, shape))} voxels at {'x'.join(f'{s:g}' for s in spacing)} mm"
    print(
        f"{paths.skeleton}: {skeleton['numTraining']} healthy scans of "
        f"{len(set(skeleton['subjects'].values()))} volunteers"
    )
    print(
        f"{paths.lesion}: {lesion['numTraining']} patients, {len(volumes)} lesions "
        f"({n_large} >= 1 mL)"
    )
    mimics = sum(
        n
        for spec in (skeleton, lesion)
        for counts in spec["phantom"]["mimic_counts"].values()
        for n in counts.values()
    )
    cases = skeleton["numTraining"] + lesion["numTraining"]
    print(f"mimics x{args.mimics:g}: {mimics} drawn ({mimics / cases:.1f} per scan)")
    print(f"{grid}, seed {args.seed}, {elapsed:.1f} s")
    return 0
