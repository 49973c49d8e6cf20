"""Training-step time: ``LesionSegmentation`` under a Lightning Trainer against a raw PyTorch loop.

Both train the same network (same initial weights) on the same in-memory batches from the same
``DataLoader``, with the same loss (MONAI ``DiceCELoss`` as configured by the library), the same
optimiser (Adam, the configured learning rate and weight decay) and the same precision:

- **ours**: ``Trainer.fit`` of the library's module (its ``training_step`` with logging and the
  non-finite-loss check, Lightning's loops, hooks and optimiser closure); no logger, checkpoint,
  progress bar or validation, which are per-epoch or optional costs;
- **raw**: ``for batch in loader: forward, loss, backward, step``.

The first ``--warmup`` steps of each are not timed (allocator, cuDNN autotuning). Every later
step is timed on its own, from the start of one step to the start of the next (so the loop's
own work between steps counts), the device synchronised at each mark. The two are measured
alternately ``--rounds`` times, each going first in every other round (the second side of a
round ran about 3% faster), and the step times of all rounds are pooled; the ratio uses the
lower quartile of each pool. On a shared machine another process slows a random subset of
steps by a random amount: a round's mean moves with that, while the lower quartile of some sixty
steps is set by the undisturbed ones and still counts every step that is slow on its own (the
fastest step and the median are printed too). ``step ratio: R.RRx`` is ours over raw (target
at most 1.05x). At float32 on a CPU with fast bfloat16 kernels a third side times ours under
``bf16-mixed``, the CPU files' training precision: ``bf16 step ratio: R.RRx`` (bf16 over
float32, target at most 0.85x). A last side times ours with ``model.channels_last=true`` at
that training precision: ``channels last step ratio: R.RRx`` (over ours in the usual layout at
the same precision; below 1 means the layout is faster on this machine; no target).

Usage: ``python benchmarks/bench_step.py [--backbone unet_tiny] [--patch 32] [--batch 2]
[--steps 10] [--warmup 3] [--rounds 6] [--precision 32-true]``. On a GPU, e.g.
``--backbone swin_unetr --patch 96 --precision 16-mixed`` is the paper's step.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import statistics
import time
import warnings
from collections.abc import Iterable

import lightning as L
import torch
from torch.utils.data import DataLoader

from sap_lightning.config import load_config
from sap_lightning.core.mixed_precision import cpu_has_fast_kernels
from sap_lightning.modules import build_module
from sap_lightning.modules.losses import create_loss

DATA_INFO = {
    "in_channels": 2,
    "num_classes": 2,
    "channel_names": ["T1", "b1000"],
    "label_names": ["background", "lesion"],
    "spacing": [1.5, 1.5, 4.0],
}


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _device() -> torch.device:
    """The accelerator Lightning's ``accelerator="auto"`` picks, or the CPU."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    current = accelerator.current_accelerator() if accelerator is not None else None
    return current if current is not None else torch.device("cpu")


def make_batches(count: int, batch: int, patch: int, seed: int = 0) -> list[dict]:
    """Image in [0, 1] and a sparse binary label, as the lesion loader gives."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1, patch, patch, patch)
    return [
        {
            "image": torch.rand(batch, 2, patch, patch, patch, generator=generator),
            "label": (torch.rand(shape, generator=generator) > 0.97).long(),
            "case_id": [f"case{i}" for i in range(batch)],
        }
        for _ in range(count)
    ]


class StepTimer(L.Callback):
    """Start time of every training step from ``warmup`` on, and the end of the last one."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.marks: list[float] = []
        self.last_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            _synchronize(pl_module.device)
            self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _synchronize(pl_module.device)
        self.last_end = time.perf_counter()


def _intervals(marks: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(marks)]


def lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[0]


def time_lightning(
    module: L.LightningModule, loader: DataLoader, args, precision: str | None = None
) -> list[float]:
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=precision or args.precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=True,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return _intervals([*timer.marks, timer.last_end])


def time_raw(net: torch.nn.Module, loader: Iterable[dict], cfg, device, args) -> list[float]:
    """The plain loop, with the same autocast / gradient scaling as Lightning's precision."""
    net = net.to(device).train()
    loss_fn = create_loss(cfg.loss)  # as LesionSegmentation builds it (no deep supervision)
    optimizer = torch.optim.Adam(
        net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    mixed = args.precision in ("16-mixed", "bf16-mixed")
    dtype = torch.float16 if args.precision == "16-mixed" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    marks = []
    for step, batch in enumerate(loader):
        if step >= args.warmup:
            _synchronize(device)
            marks.append(time.perf_counter())
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            loss = loss_fn(net(image), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _synchronize(device)
    marks.append(time.perf_counter())
    return _intervals(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet_tiny")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    settings = [
        "task=lesion",
        f"model.backbone={args.backbone}",
        f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
        f"data.batch_size={args.batch}",
        "optim.lr=1e-4",
    ]
    cfg = load_config(None, settings)
    channels_last_cfg = load_config(None, [*settings, "model.channels_last=true"])
    torch.manual_seed(0)
    template = build_module(cfg, DATA_INFO)
    initial_state = copy.deepcopy(template.state_dict())
    batches = make_batches(args.warmup + args.steps, args.batch, args.patch)
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    device = _device()
    print(
        f"LesionSegmentation step: {args.backbone}, batch {args.batch} x 2 x {args.patch}^3, "
        f"{args.precision}, {args.steps} timed steps after {args.warmup}, on {device.type}"
    )

    # On a CPU with fast bfloat16 kernels a float32 run also times the module under the CPU
    # files' bf16-mixed (small convolutions guarded, losses in float32): "bf16 step ratio".
    with_bf16 = (
        args.precision == "32-true" and device.type == "cpu" and cpu_has_fast_kernels("bf16-mixed")
    )
    times: dict[str, list[float]] = {
        "ours": [],
        "raw": [],
        "ours bf16": [],
        "ours channels-last": [],
    }
    # model.channels_last is timed at the precision the CPU files train at (bf16 where the
    # CPU has the kernels), against ours at that precision: "channels last step ratio".
    reference = "ours bf16" if with_bf16 else "ours"
    channels_last_precision = "bf16-mixed" if with_bf16 else args.precision

    def fresh_module(config=cfg) -> L.LightningModule:
        module = build_module(config, DATA_INFO)
        module.load_state_dict(initial_state)
        return module

    def fresh_net() -> torch.nn.Module:
        net = copy.deepcopy(template.net)
        net.load_state_dict({k[4:]: v for k, v in initial_state.items() if k.startswith("net.")})
        return net

    sides = {
        "ours": lambda: time_lightning(fresh_module(), loader, args),
        "raw": lambda: time_raw(fresh_net(), loader, cfg, device, args),
        "ours bf16": lambda: time_lightning(fresh_module(), loader, args, "bf16-mixed"),
        "ours channels-last": lambda: time_lightning(
            fresh_module(channels_last_cfg), loader, args, channels_last_precision
        ),
    }
    if not with_bf16:
        del sides["ours bf16"]

    order = list(sides)
    for round_index in range(args.rounds):
        # The side that runs later in a round ran about 3% faster (warm allocator and caches):
        # the order rotates between rounds so that no side always has it.
        shift = round_index % len(order)
        means = {}
        for side in order[shift:] + order[:shift]:
            measured = sides[side]()
            times[side] += measured
            means[side] = statistics.mean(measured)
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{side} {means[side] * 1e3:.1f} ms/step" for side in order)
            + " (means)"
        )
    ours, raw = times["ours"], times["raw"]
    print(f"{len(ours)} steps each, ms/step:  fastest  lower quartile  median")
    labels = {
        "ours": "ours (Lightning module)",
        "raw": "raw PyTorch loop",
        "ours bf16": "ours, bf16-mixed",
        "ours channels-last": f"ours, channels-last, {channels_last_precision}",
    }
    width = max(len(labels[side]) for side in order) + 2
    for side in order:
        values = times[side]
        print(
            f"{labels[side] + ':':{width}s}{min(values) * 1e3:8.1f}"
            f"{lower_quartile(values) * 1e3:16.1f}{statistics.median(values) * 1e3:8.1f}"
        )
    if with_bf16:
        bf16 = lower_quartile(times["ours bf16"]) / lower_quartile(ours)
        print(f"bf16 step ratio: {bf16:.2f}x")
    channels_last = lower_quartile(times["ours channels-last"]) / lower_quartile(times[reference])
    print(f"channels last: against {labels[reference]}")
    print(f"channels last step ratio: {channels_last:.2f}x")
    print(f"step ratio: {lower_quartile(ours) / lower_quartile(raw):.2f}x")


if __name__ == "__main__":
    main()
