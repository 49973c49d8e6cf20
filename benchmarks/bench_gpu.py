"""What a first GPU run of the paper configuration should measure, in one script (< 10 min).

1. **train**: Swin UNETR (feature size 48) training steps per second on 96^3 two-channel
   patches, batch 2 (the paper's per-GPU batch), 16-bit mixed precision with a gradient scaler
   (float32 on the CPU), Adam, MONAI Dice + cross-entropy; the first steps are not timed.
2. **loader**: patches per second the library's training loader sustains with ``--workers``
   workers on a synthetic cohort of whole-body grids (192 x 192 x 384), 96^3 patches, the paper's
   augmentations, against what the training step consumes (``feed ratio``: loader patches/s over
   trained patches/s; >= 1 means the GPU never waits for data).
3. **inference**: ``sap predict``'s in-memory path (normalisation, sliding window with
   Gaussian blending at overlap 0.25, softmax) on a whole-body volume, under autocast.

Peak memory per phase is ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS
so far on the CPU. Prints one table, then ``feed ratio: R.RRx`` (target >= 1x).

``--quick`` runs the same phases at sizes a CPU finishes in seconds (feature size 12, batch 1
of 64^3 for one step, the loader on the ``tiny`` 64 x 64 x 128 grid with 32^3 patches, a
64^3 volume); the tests run it so this script keeps working until a GPU runs it for real.

    python benchmarks/bench_gpu.py [--quick] [--workers N] [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Sizes:
    feature_size: int
    patch: int
    batch: int
    steps: int
    warmup: int
    grid: str
    loader_patch: int
    patients: int
    loader_patches: int
    volume: tuple[int, int, int]
    sw_batch: int


FULL = Sizes(48, 96, 2, 20, 5, "large", 96, 4, 96, (192, 192, 384), 4)
QUICK = Sizes(12, 64, 1, 1, 0, "tiny", 32, 5, 16, (64, 64, 64), 1)
"""Quick: Swin UNETR needs 64^3 to train (its 1/32 bottleneck must be more than one voxel for
instance norm); the tiny grid plans only 32^3 patches, so the quick feed ratio is not meaningful."""


def _rate(per_second: float) -> str:
    """Two decimals, or two significant digits below 1: a quick CPU step can take a minute."""
    return f"{per_second:.2f}" if per_second >= 1 else f"{per_second:.2g}"


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """16-bit mixed precision on a GPU; float32 elsewhere: a CPU without native bfloat16 runs
    the quick Swin UNETR step 7 times slower under bfloat16 autocast (59 s against 8 s)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _network(sizes: Sizes, device: torch.device) -> torch.nn.Module:
    from sap_lightning.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("swin_unetr", 2, 2, feature_size=sizes.feature_size).to(device)


def train_steps(sizes: Sizes, device: torch.device) -> tuple[float, float]:
    """Seconds per training step and peak memory (MB)."""
    from monai.losses import DiceCELoss

    net = _network(sizes, device).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-5, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    shape = (sizes.batch, 2, *(sizes.patch,) * 3)
    image = torch.rand(shape, device=device)
    label = (torch.rand((sizes.batch, 1, *shape[2:]), device=device) > 0.95).long()
    _reset_peak(device)
    start = 0.0
    for step in range(sizes.warmup + sizes.steps):
        if step == sizes.warmup:
            _sync(device)
            start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(net(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
    _sync(device)
    return (time.perf_counter() - start) / sizes.steps, _peak_mb(device)


def loader_rate(sizes: Sizes, workers: int, seed: int = 0) -> float:
    """Training patches per second of the library's loader (augmentations on)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_loader import _ours
    from sap_lightning.batches.datamodule import build_datamodule
    from sap_lightning.cache import preprocess_dataset
    from sap_lightning.config import load_config
    from sap_lightning.synthetic import SIZES, make_phantom_cohort

    shape, spacing = SIZES[sizes.grid]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        cohort = make_phantom_cohort(
            Path(tmp) / "phantoms", n_healthy=1, n_patients=sizes.patients, seed=seed,
            shape=shape, spacing=spacing, workers=max(1, workers),
        )  # fmt: skip
        cfg = load_config(
            None,
            [
                "task=lesion",
                f"data.dataset={cohort.lesion}",
                "data.n_folds=3",
                "data.fold=1",
                "data.tuning_fold=0",
                f"data.patch_size=[{','.join([str(sizes.loader_patch)] * 3)}]",
                f"data.batch_size={sizes.batch}",
                f"data.num_workers={workers}",
                f"seed={seed}",
            ],
        )
        datamodule = build_datamodule(cfg)
        preprocess_dataset(cohort.lesion, datamodule.cache_root, workers=max(1, workers))
        datamodule.prepare_data()
        datamodule.setup("fit")
        seconds, count = _ours(datamodule, sizes.loader_patches)
        del datamodule
    return count / seconds


def inference(sizes: Sizes, device: torch.device) -> tuple[float, float]:
    """Seconds for one whole-volume prediction and peak memory (MB)."""
    from sap_lightning.cache import prepare_image
    from sap_lightning.core.windows import predict_volume

    net = _network(sizes, device).eval()
    raw = np.random.default_rng(0).gamma(2.0, 100.0, size=(2, *sizes.volume)).astype(np.float32)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    normed, _, _ = prepare_image(raw, np.eye(4))
    with _autocast(device):
        probs = predict_volume(
            net, torch.from_numpy(normed)[None], [sizes.patch] * 3,
            sw_batch_size=sizes.sw_batch, overlap=0.25, device=device, channels=[1],
        )  # fmt: skip
    _sync(device)
    seconds = time.perf_counter() - start
    assert probs.shape[-3:] == sizes.volume and bool(torch.isfinite(probs).all())
    return seconds, _peak_mb(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--workers", type=int, default=None, help="default: usable CPUs, <= 8")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sap_lightning.core.threads import configure_threads, usable_cpus

    configure_threads()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = QUICK if args.quick else FULL
    if args.steps is not None:
        sizes = Sizes(**{**sizes.__dict__, "steps": args.steps})
    workers = args.workers if args.workers is not None else min(8, usable_cpus())
    if args.quick and args.workers is None:
        workers = min(2, usable_cpus())
    precision = "16-mixed" if device.type == "cuda" else "32-true"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory = "max_memory_allocated" if device.type == "cuda" else "peak RSS so far"

    step_s, train_mb = train_steps(sizes, device)
    patches_s = loader_rate(sizes, workers)
    infer_s, infer_mb = inference(sizes, device)
    trained_patches_s = sizes.batch / step_s
    volume = "x".join(map(str, sizes.volume))
    rows = [
        (
            "train",
            f"swin_unetr fs{sizes.feature_size} {sizes.patch}^3 batch {sizes.batch} {precision}",
            f"{_rate(1 / step_s)} steps/s ({_rate(trained_patches_s)} patches/s)",
            f"{train_mb:.0f}",
        ),
        (
            "loader",
            f"{workers} workers, {sizes.grid} grid, {sizes.loader_patch}^3, augmented",
            f"{patches_s:.1f} patches/s",
            "-",
        ),
        (
            "inference",
            f"{volume} volume, roi {sizes.patch}^3, sw batch {sizes.sw_batch}, overlap 0.25",
            f"{infer_s:.2f} s per volume",
            f"{infer_mb:.0f}",
        ),
    ]
    print(f"device: {name} ({device}); torch {torch.__version__}; peak memory = {memory}")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"{'phase':<{widths[0]}}  {'setting':<{widths[1]}}  {'rate':<{widths[2]}}  peak MB")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    print(f"feed ratio: {patches_s / trained_patches_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
