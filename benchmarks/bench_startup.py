"""Start-up cost of a command on an unchanged dataset: the dataset check, first and second time.

Every command that reads a dataset (``check-data``, ``preprocess``, ``split``, training,
``evaluate``) validates it first with ``require_valid_dataset``, which reads every voxel of every
file (decompression and a scan for NaN/Inf and label values: seconds per whole-body case). Clean
per-file results are remembered with each file's size, mtime and header hash
(``dataset/check_cache.py``), so the second start-up on an unchanged dataset only stats and hashes
headers.

The cohort is synthetic (``make_phantom_cohort``) at the phantom's ``large`` grid by default,
192 x 192 x 384 voxels (1.5 x 1.5 x 3 mm), two channels and a label per case. Files modified less
than ``RACY_MARGIN_NS`` before a check are not remembered (coarse file-system timestamps), so the
benchmark waits that long after writing the cohort, as any dataset copied in earlier would be.
Both runs use one process (``--workers``). The last line is ``startup ratio: R.Rx`` (first over
second).

Usage: ``python benchmarks/bench_startup.py [--patients 5] [--size large] [--workers 1]``
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from sap_lightning.dataset.check_cache import CACHE_DIR_ENV, RACY_MARGIN_NS, results_location
from sap_lightning.dataset.validate import require_valid_dataset
from sap_lightning.synthetic import SIZES, make_phantom_cohort


def _timed_check(dataset: Path, workers: int) -> float:
    start = time.perf_counter()
    require_valid_dataset(dataset, workers=workers)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="large", help="phantom grid preset (voxels)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes reading files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    shape, spacing = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        os.environ[CACHE_DIR_ENV] = str(Path(tmp) / "checks")  # not the user's check results
        start = time.perf_counter()
        cohort = make_phantom_cohort(
            Path(tmp) / "phantoms", n_healthy=1, n_patients=args.patients, seed=args.seed,
            shape=shape, spacing=spacing, workers=args.workers,
        )  # fmt: skip
        generated = time.perf_counter() - start
        dataset = cohort.lesion
        files = sum(1 for p in dataset.rglob("*.nii.gz"))
        megabytes = sum(p.stat().st_size for p in dataset.rglob("*.nii.gz")) / 1e6
        print(
            f"cohort: {args.patients} patients of {shape} voxels, {files} files, "
            f"{megabytes:.0f} MB .nii.gz (generated in {generated:.1f} s); {args.workers} worker(s)"
        )
        time.sleep(RACY_MARGIN_NS / 1e9)  # files just written are not remembered
        first = _timed_check(dataset, args.workers)
        assert results_location(dataset).is_file(), "the check results were not stored"
        second = _timed_check(dataset, args.workers)
        per_case = first / args.patients
        print(f"first  start-up (every voxel read):  {first:.2f} s ({per_case:.2f} s per case)")
        print(f"second start-up (unchanged dataset): {second:.3f} s")
    print(f"startup ratio: {first / second:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
