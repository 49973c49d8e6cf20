"""``sap skeleton-labels``: stage-1 skeleton labels from public MRI segmenters' label maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from sap_lightning.core.errors import DatasetError

_TOOLS = ("total_mr", "vertebrae_mr", "totalvibeseg", "mrsegmentator")
"""The same names as ``dataset.segmenter_tables.TABLES`` (kept here so ``--help`` stays fast;
``tests/integration/test_skeleton_labels.py`` checks they agree)."""


def add_arguments_skeleton_labels(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Group a public MRI segmenter's label maps into the ten skeleton labels (cervical C1-C7, "
        "thoracic T1-T12, lumbar L1-L5, pelvis = hips + sacrum, femurs, humeri, scapulae, "
        "clavicles, sternum) and write a skeleton dataset with the images. Repeat --tool/--labels "
        "to merge sources (e.g. total_mr for the limbs and pelvis, vertebrae_mr for the spine "
        "levels); where two sources label a region, the later one wins."
    )
    parser.add_argument("out", type=Path, help="new dataset folder (must not exist or be empty)")
    parser.add_argument(
        "--tool",
        action="append",
        choices=_TOOLS,
        required=True,
        help="the segmenter that made the next --labels folder (TotalSegmentator total_mr or "
        "vertebrae_mr, TotalVibeSegmentator, MRSegmentator)",
    )
    parser.add_argument(
        "--labels",
        action="append",
        type=Path,
        required=True,
        help="folder of label maps, one per case: <case>.nii.gz (also <case>_0000[_seg]), or "
        "<case>/ with one mask per structure (TotalSegmentator without --ml); on the T1 grid",
    )
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of <case>_0000.nii.gz (T1) and <case>_0001.nii.gz (b1000 on the T1 grid)",
    )
    parser.add_argument("--name", default=None, help="dataset name (default: OUT's name)")


def run_skeleton_labels(args: argparse.Namespace) -> int:
    from sap_lightning.dataset.skeleton_labels import make_skeleton_dataset

    if len(args.tool) != len(args.labels):
        raise DatasetError(
            f"give one --labels folder per --tool ({len(args.tool)} --tool, "
            f"{len(args.labels)} --labels)"
        )
    result = make_skeleton_dataset(
        list(zip(args.tool, args.labels)), args.images, args.out, name=args.name
    )
    n = len(result.cases)
    print(f"wrote {n} cases to {result.root} from {' + '.join(args.tool)}")
    if result.regions_missing:
        print(
            "regions missing (no source segments them; they stay background): "
            + ", ".join(result.regions_missing)
        )
    for region, parts in result.regions_partial.items():
        print(f"region {region} incomplete: no source segments {', '.join(parts)}")
    if result.unlevelled_spine and {"cervical_spine", "thoracic_spine"} & set(
        result.regions_missing
    ):
        print(
            "spine without levels left background: "
            + ", ".join(result.unlevelled_spine)
            + " (add --tool vertebrae_mr for C/T/L levels)"
        )
    seen = ", ".join(f"{region} {count}/{n}" for region, count in result.cases_per_region.items())
    print(f"cases showing each region: {seen}")
    print(f"next: sap check-data {result.root}")
    return 0
