"""What a first GPU run of the paper configuration should measure, in one script (< 10 min).

Every row is printed as soon as it is measured:

1. **train (memory)**: Swin UNETR (feature size 48) training steps per second on 96^3
   two-channel patches, batch 2 per GPU, at the run's precision (``--precision``, default the
   paper's ``16-mixed``, with a gradient scaler), Adam, the library's Dice + cross-entropy, the
   batch already on the GPU. Warm-up steps are not timed.
2. **train (loader)**: the same loop fed by the library's training loader (``--workers``
   workers, the paper's augmentations, a synthetic cohort of whole-body 192 x 192 x 384 grids):
   what training really gets. ``feed ratio`` = loader-fed / memory-fed steps per second; below
   0.95 the GPU waits for data. (Timing the loader alone hides that wait.)
3. **variants** of the memory-fed loop, each with its own warm-up: ``bf16-mixed``,
   ``channels_last_3d``, TF32 matmuls and convolutions at ``32-true``, and ``torch.compile``;
   a variant the device cannot run is listed as skipped, one that fails with its reason.
4. **inference**: ``sap predict``'s in-memory path (normalisation, sliding window with Gaussian
   blending at overlap 0.25, softmax) on a whole-body volume at the run's precision, after one
   untimed warm-up prediction.

cuDNN's autotuner is on, as training turns it on (``trainer.deterministic=false``). Memory
columns: the GPU's ``max_memory_allocated`` and this process's peak resident memory, both reset
before each row (loader workers are separate processes, not counted).

Without CUDA the script refuses to run the full sizes; ``--quick`` runs every row at sizes a
CPU finishes in seconds (the tiny U-Net on 32^3 patches of the ``tiny`` grid, a 64^3 volume),
which the tests run so the script keeps working until a GPU runs it for real.

    python benchmarks/bench_gpu.py [--quick] [--precision 16-mixed] [--workers N] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Sizes:
    backbone: str
    kwargs: dict[str, Any]
    patch: int
    batch: int
    steps: int
    warmup: int
    grid: str
    patients: int
    volume: tuple[int, int, int]
    sw_batch: int
    predictions: int


FULL = Sizes("swin_unetr", {"feature_size": 48}, 96, 2, 20, 5, "large", 4, (192, 192, 384), 4, 3)
QUICK = Sizes(
    "unet_tiny", {"features": [4, 8, 8, 8, 8, 4]}, 32, 2, 3, 1, "tiny", 5, (64,) * 3, 2, 1
)
"""Quick: the tiny U-Net on the tiny grid, whose 64-voxel width plans 32^3 patches."""

COLUMNS = (("phase", 16), ("setting", 58), ("rate", 34), ("GPU MB", 8), ("host MB", 8))


def _row(*cells: str) -> None:
    print("  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, COLUMNS)).rstrip(), flush=True)


def _rate(per_second: float) -> str:
    """Two decimals, or two significant digits below 1."""
    return f"{per_second:.2f}" if per_second >= 1 else f"{per_second:.2g}"


# --------------------------------------------------------------------------------------------
# Memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peaks(device: torch.device) -> tuple[str, str]:
    gpu = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
    try:
        status = Path("/proc/self/status").read_text()
        host_kb = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
    except (OSError, StopIteration, ValueError):
        host_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gpu, f"{host_kb / 1024:.0f}"


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    channels_last: bool = False
    tf32: bool = False
    compile: bool = False


def _network(sizes: Sizes, device: torch.device, variant: Variant) -> torch.nn.Module:
    from sap_lightning.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone(sizes.backbone, 2, 2, **sizes.kwargs).to(device)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return torch.compile(net) if variant.compile else net


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def train_rate(
    sizes: Sizes, device: torch.device, variant: Variant, batches: Callable[[], Iterator[dict]]
) -> float:
    """Optimiser steps per second of the library's loss on ``batches()`` (warm-up untimed)."""
    from sap_lightning.config.schema import LossConfig
    from sap_lightning.core.mixed_precision import AUTOCAST_DTYPES
    from sap_lightning.modules.losses import create_loss, loss_in_float32

    net = _network(sizes, device, variant).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-5, weight_decay=1e-5)
    loss_fn = create_loss(LossConfig())
    dtype = AUTOCAST_DTYPES[variant.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    memory_format = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    stream = batches()
    start = 0.0
    with _tf32(variant.tf32):
        for step in range(sizes.warmup + sizes.steps):
            if step == sizes.warmup:
                _sync(device)
                start = time.perf_counter()
            batch = next(stream)
            image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = net(image)
            loss = loss_in_float32(loss_fn, logits, label)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        _sync(device)
    return sizes.steps / (time.perf_counter() - start)


def loader_batches(datamodule: Any) -> Iterator[dict]:
    """The training loader's batches, epoch after epoch (as the Trainer draws them)."""
    loader = datamodule.train_dataloader()
    epoch = 0
    while True:
        datamodule.set_train_epoch(epoch)
        yield from loader
        epoch += 1


def build_datamodule(root: Path, sizes: Sizes, workers: int) -> Any:
    """The lesion data module on a synthetic cohort of ``sizes.grid`` phantoms, set up for fit."""
    from sap_lightning.batches.datamodule import build_datamodule as build
    from sap_lightning.cache import preprocess_dataset
    from sap_lightning.config import load_config
    from sap_lightning.synthetic import SIZES, make_phantom_cohort

    shape, spacing = SIZES[sizes.grid]
    cohort = make_phantom_cohort(
        root / "phantoms", n_healthy=1, n_patients=sizes.patients, seed=0, shape=shape,
        spacing=spacing, workers=max(1, workers),
    )  # fmt: skip
    cfg = load_config(
        None,
        [
            "task=lesion", f"data.dataset={cohort.lesion}", "data.n_folds=3", "data.fold=1",
            "data.tuning_fold=0", f"data.patch_size=[{','.join([str(sizes.patch)] * 3)}]",
            f"data.batch_size={sizes.batch}", f"data.num_workers={workers}",
        ],
    )  # fmt: skip
    datamodule = build(cfg)
    preprocess_dataset(cohort.lesion, datamodule.cache_root, workers=max(1, workers))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


# --------------------------------------------------------------------------------------------
# Inference


def inference_seconds(sizes: Sizes, device: torch.device, precision: str) -> float:
    """Seconds per whole-volume prediction at ``precision`` (one untimed warm-up first)."""
    from sap_lightning.cache import prepare_image
    from sap_lightning.core.windows import predict_volume

    net = _network(sizes, device, Variant("inference", precision)).eval()
    raw = np.random.default_rng(0).gamma(2.0, 100.0, size=(2, *sizes.volume)).astype(np.float32)

    def predict() -> None:
        normed, _, _ = prepare_image(raw, np.eye(4))
        probs = predict_volume(
            net, torch.from_numpy(normed)[None], [sizes.patch] * 3, sw_batch_size=sizes.sw_batch,
            overlap=0.25, device=device, channels=[1], precision=precision,
        )  # fmt: skip
        assert probs.shape[-3:] == sizes.volume and bool(torch.isfinite(probs).all())

    predict()
    _sync(device)
    start = time.perf_counter()
    for _ in range(sizes.predictions):
        predict()
    _sync(device)
    return (time.perf_counter() - start) / sizes.predictions


# --------------------------------------------------------------------------------------------


def variants(precision: str, device: torch.device, quick: bool) -> list[tuple[Variant, str]]:
    """The variants to time, each with why it is skipped ("" when it runs)."""
    from sap_lightning.core.mixed_precision import cpu_has_fast_kernels

    cuda = device.type == "cuda"
    bf16 = (
        torch.cuda.is_bf16_supported(including_emulation=False)
        if cuda
        else cpu_has_fast_kernels("bf16-mixed")
    )
    return [
        (Variant("bf16-mixed", "bf16-mixed"), "" if bf16 else f"no bfloat16 on this {device.type}"),
        (Variant("channels_last_3d", precision, channels_last=True), ""),
        (Variant("tf32", "32-true", tf32=True), "" if cuda else "TF32 is a CUDA feature"),
        (
            Variant("torch.compile", precision, compile=True),
            "" if cuda else ("--quick on the CPU" if quick else ""),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    from sap_lightning.core.precision import AUTOCAST_PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--precision", choices=list(AUTOCAST_PRECISIONS), default=None,
                        help="default: 16-mixed on a GPU (the paper), 32-true on the CPU")  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: CPUs, <= 8)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sap_lightning.core.mixed_precision import effective_precision
    from sap_lightning.core.threads import configure_threads, usable_cpus

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.quick:
        print(
            f"bench_gpu: error: no CUDA device ({device}): the full sizes are a GPU's; run on a GPU "
            "node (make bench-gpu) or pass --quick for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    configure_threads()
    torch.backends.cudnn.benchmark = True  # as training (fixed patch shapes)
    sizes = QUICK if args.quick else FULL
    if args.steps is not None:
        sizes = replace(sizes, steps=args.steps)
    workers = (
        args.workers if args.workers is not None else min(2 if args.quick else 8, usable_cpus())
    )
    precision = effective_precision(
        args.precision or ("16-mixed" if device.type == "cuda" else "32-true"), device
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} ({device}); torch {torch.__version__}; precision {precision}; "
          f"{workers} loader workers", flush=True)  # fmt: skip
    _row(*(title for title, _ in COLUMNS))
    net_name = f"{sizes.backbone} {sizes.patch}^3 batch {sizes.batch}"

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        datamodule = build_datamodule(Path(tmp), sizes, workers)
        resident = next(loader_batches(datamodule))
        resident = {k: v.to(device) for k, v in resident.items() if k in ("image", "label")}

        def from_memory() -> Iterator[dict]:
            while True:
                yield resident

        rates: dict[str, float] = {}
        plain = Variant("memory", precision)
        for label, variant, source, what in (
            ("train (memory)", plain, from_memory, "batch on the device"),
            ("train (loader)", plain, lambda: loader_batches(datamodule), f"training loader, {workers} workers"),
        ):  # fmt: skip
            _reset_peaks(device)
            rates[label] = train_rate(sizes, device, variant, source)
            _row(
                label,
                f"{net_name} {precision}, {what}",
                f"{_rate(rates[label])} steps/s",
                *_peaks(device),
            )
        for variant, skipped in variants(precision, device, args.quick):
            setting = f"{net_name} {variant.precision}, batch on the device"
            if skipped:
                _row(variant.name, setting, f"skipped: {skipped}", "-", "-")
                continue
            _reset_peaks(device)
            try:
                rate = train_rate(sizes, device, variant, from_memory)
            except Exception as err:  # a variant that fails is reported, not fatal
                _row(variant.name, setting, f"failed: {str(err).splitlines()[0][:60]}", "-", "-")
                continue
            relative = rate / rates["train (memory)"]
            _row(variant.name, setting, f"{_rate(rate)} steps/s ({relative:.2f}x)", *_peaks(device))
        datamodule.queue.close()  # the loader's feed thread

    _reset_peaks(device)
    seconds = inference_seconds(sizes, device, precision)
    volume = "x".join(map(str, sizes.volume))
    setting = f"{volume} volume, roi {sizes.patch}^3, sw batch {sizes.sw_batch}, {precision}"
    _row("inference", setting, f"{seconds:.2f} s per volume", *_peaks(device))
    ratio = rates["train (loader)"] / rates["train (memory)"]
    print(f"feed ratio: {ratio:.2f}x (loader-fed / memory-fed steps per second; below 0.95 the "
          "GPU waits for data)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
