"""Training-patch throughput: this library's loader against a plain TorchIO queue.

Both stream two-channel patches (with their label) from the same synthetic patients, with the
same number of loader workers and no augmentation (so only loading and sampling are timed):

- **ours**: the lesion DataModule's training loader (preprocessing cache, memory-mapped reads of
  one patch per task, instance-balanced epoch plan, ``tio.Queue`` over patch tasks, persistent
  workers writing into a shared-memory ring);
- **plain**: ``tio.Queue`` over a ``tio.SubjectsDataset`` of the ``.nii.gz`` files with a
  ``tio.LabelSampler`` (lesion and background centres equally likely), reading every channel
  and normalising intensities to the 1st-99th percentile of the volume (docs/method.md) each time a
  volume is loaded, as a pipeline without a cache must.

Every phantom grid is measured in one run (``--sizes``): ``small`` 96 x 96 x 192 (64^3 patches),
``medium`` 128 x 128 x 256 and ``large`` 192 x 192 x 384 (96^3 patches, the paper's). The plain
pipeline's cost grows with the volume while ours does not, so the small grid is the hard case.
The cache is built before timing (a one-off cost, printed separately). Timing starts after the
first batch of each loader (worker start-up) and covers ``--patches`` patches. The table gives
each size; the last line is ``loader ratio: R.Rx`` (ours over plain patches per second, the
worst size; target >= 5x).

Usage: ``python benchmarks/bench_loader.py [--sizes small medium large] [--patients 5]
[--workers 2] [--patches 128]``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torchio as tio

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.cache import preprocess_dataset
from sap_lightning.config import load_config
from sap_lightning.dataset import layout
from sap_lightning.synthetic import SIZES, make_phantom_cohort

PATCH = {"small": 64, "medium": 96, "large": 96}
"""Patch edge per phantom grid: the paper's 96^3, except on the ``small`` grid (96 voxels
across), where a 96^3 window never misses a lesion and 64^3 is the largest that plans."""
N_FOLDS = 3


def _timed_patches(batches: Iterable[dict], wanted: int) -> tuple[float, int]:
    """Seconds to draw at least ``wanted`` patches, after the first batch; and the count."""
    iterator: Iterator[dict] = iter(batches)
    next(iterator)  # worker start-up and first queue fill are not timed
    count = 0
    start = time.perf_counter()
    for batch in iterator:
        count += len(batch["image"])
        if count >= wanted:
            break
    return time.perf_counter() - start, count


def _ours(datamodule, wanted: int, epochs: int = 1000) -> tuple[float, int]:
    def batches() -> Iterator[dict]:
        loader = datamodule.train_dataloader()
        for epoch in range(epochs):
            datamodule.set_train_epoch(epoch)
            yield from loader

    return _timed_patches(batches(), wanted)


def _plain(
    dataset: Path, case_ids: list[str], workers: int, batch_size: int, queue_length: int,
    samples_per_volume: int, wanted: int, patch: int,
) -> tuple[float, int]:  # fmt: skip
    subjects = [
        tio.Subject(
            image=tio.ScalarImage([layout.image_path(dataset, case_id, c) for c in range(2)]),
            label=tio.LabelMap(layout.label_path(dataset, case_id)),
        )
        for case_id in case_ids
    ]
    normalise = tio.RescaleIntensity(out_min_max=(0, 1), percentiles=(1, 99))
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=normalise),
        max_length=queue_length,
        samples_per_volume=samples_per_volume,
        sampler=tio.LabelSampler(patch, label_name="label", label_probabilities={0: 1, 1: 1}),
        num_workers=workers,
    )
    loader = tio.SubjectsLoader(queue, batch_size=batch_size, num_workers=0)

    def batches() -> Iterator[dict]:
        while True:
            for batch in loader:
                yield {"image": batch["image"][tio.DATA], "label": batch["label"][tio.DATA]}

    return _timed_patches(batches(), wanted)


def _measure(size: str, args: argparse.Namespace) -> tuple[float, float]:
    """Patches per second of ours and of the plain queue on a fresh cohort of ``size``."""
    shape, spacing = SIZES[size]
    patch = PATCH[size]
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        start = time.perf_counter()
        cohort = make_phantom_cohort(
            Path(tmp) / "phantoms", n_healthy=1, n_patients=args.patients, seed=args.seed,
            shape=shape, spacing=spacing, workers=args.workers,
        )  # fmt: skip
        generated = time.perf_counter() - start
        cfg = load_config(
            None,
            [
                "task=lesion",
                f"data.dataset={cohort.lesion}",
                f"data.n_folds={N_FOLDS}",
                "data.fold=1",
                "data.tuning_fold=0",
                f"data.patch_size=[{patch},{patch},{patch}]",
                f"data.batch_size={args.batch_size}",
                f"data.queue_length={args.queue_length}",
                f"data.num_workers={args.workers}",
                "data.augment.flip_p=0",
                "data.augment.rot90_p=0",
                "data.augment.intensity_p=0",
                f"seed={args.seed}",
            ],
        )
        datamodule = build_datamodule(cfg)
        start = time.perf_counter()
        preprocess_dataset(cohort.lesion, datamodule.cache_root, workers=args.workers)
        datamodule.prepare_data()  # the splits
        cached = time.perf_counter() - start
        datamodule.setup("fit")
        cases = datamodule.train_case_ids
        print(
            f"[{size}] {args.patients} patients of {shape} voxels (generated in {generated:.1f} "
            f"s), {len(cases)} training cases, cache built in {cached:.1f} s; patch {patch}^3; "
            f"{datamodule.queue_memory}"
        )
        ours_s, ours_n = _ours(datamodule, args.patches)
        plain_s, plain_n = _plain(
            cohort.lesion, cases, args.workers, args.batch_size, args.queue_length,
            args.samples_per_volume, args.patches, patch,
        )  # fmt: skip
        del datamodule  # stops the persistent loader workers before the folder goes
    return ours_n / ours_s, plain_n / plain_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument(
        "--sizes", nargs="+", choices=sorted(PATCH), default=list(PATCH),
        help="phantom grid presets (voxels)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=128, help="patches timed per loader")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--queue-length", type=int, default=32)
    parser.add_argument("--samples-per-volume", type=int, default=8, help="plain queue only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rates = {size: _measure(size, args) for size in args.sizes}
    print(
        f"2 channels + label, batch {args.batch_size}, {args.workers} workers, queue length "
        f"{args.queue_length}, {args.patches} patches timed per loader; plain: "
        f"{args.samples_per_volume} patches per volume"
    )
    print(f"{'size':>8}{'volume':>16}{'patch':>7}{'ours /s':>10}{'plain /s':>10}{'ratio':>8}")
    for size, (ours, plain) in rates.items():
        volume = "x".join(map(str, SIZES[size][0]))
        print(
            f"{size:>8}{volume:>16}{PATCH[size]:>6}^3{ours:10.1f}{plain:10.1f}{ours / plain:7.1f}x"
        )
    print(f"loader ratio: {min(ours / plain for ours, plain in rates.values()):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
