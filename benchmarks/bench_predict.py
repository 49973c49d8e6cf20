"""Inference cost of ``sap predict`` versus bare MONAI ``sliding_window_inference``.

Both sides run the same network with the same windows, overlap and Gaussian blending on a
two-channel volume, at the default whole-body shape and at the phantom's ``small`` grid:

- **bare**: ``sliding_window_inference`` on the raw volume, logits on the CPU;
- **ours**: what ``sap predict`` does to a case in memory (``inference/predict.py``):
  whole-volume normalisation, windows, in-place softmax keeping the lesion class, the 16-bit
  rounding and the mask at the threshold (file writing is not timed on either side);
- **bf16**: the same at ``validation.precision: bf16-mixed`` (windows under bfloat16 autocast),
  where the CPU has fast bfloat16 kernels (oneDNN's check); elsewhere it is left out.

Each run is its own process so peak memory (max RSS) is its own; it predicts the volume
``--repeats`` times, as ``sap predict`` goes from case to case, so the first call's one-off costs
(kernel selection, first-touch page faults) do not decide a 2-second measurement; the sides
take turns for ``--rounds`` rounds (the order rotating each round) and the fastest volume
counts (the least disturbed on a shared machine).
Memory is the peak RSS above the process's RSS after imports and network (the same on both
sides). For reference the table also shows the floor of any whole-volume inference (2-channel
input, 2-class output, network): both sides exceed it by the network's activations on a batch
of windows. Ends with ``predict memory ratio: R.RRx`` (our memory over bare's, the worse
shape; target < 2x), ``predict ratio: R.RRx`` (our time over bare, the worse shape; target
<= 1.10x) and, with fast bfloat16 kernels, ``bf16 predict ratio: R.RRx`` (bf16 over ours, the
worse shape; target <= 0.8x).

    python benchmarks/bench_predict.py [--shapes 160x160x320 96x96x192] [--backbone unet_tiny]
        [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from sap_lightning.core.mixed_precision import effective_precision

ROI = [64, 64, 64]
OVERLAP = 0.25
SW_BATCH = 2
THRESHOLD = 0.5


def _network(backbone: str) -> torch.nn.Module:
    from sap_lightning.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(backbone, 2, 2).eval()


def _volume(shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.gamma(2.0, 100.0, size=(2, *shape)).astype(np.float32)


def _worker(side: str, shape: list[int], backbone: str, repeats: int) -> dict:
    from pathlib import Path

    from monai.inferers import sliding_window_inference

    from sap_lightning.inference.models import TrainedModel
    from sap_lightning.inference.predict import as_stored, predict_probabilities

    net = _network(backbone)
    base_mb = _rss_mb()  # libraries and network: the same on both sides, not counted
    raw = _volume(shape)
    times = []
    for _ in range(repeats):  # `sap predict` runs case after case in one process
        start = time.perf_counter()
        if side in ("ours", "bf16"):
            precision = "bf16-mixed" if side == "bf16" else "32-true"
            model = TrainedModel(
                net, {"task": "lesion"}, ROI, THRESHOLD, Path("bench"), precision, SW_BATCH
            )
            lesion = predict_probabilities(
                model, raw, np.eye(4), case_id="bench", device=torch.device("cpu"),
                overlap=OVERLAP, progress=False, channels=[1],
            )[0]  # fmt: skip
            as_stored(lesion, THRESHOLD)
        else:
            with torch.no_grad():
                logits = sliding_window_inference(
                    torch.from_numpy(raw)[None], ROI, SW_BATCH, net, overlap=OVERLAP,
                    mode="gaussian",
                )  # fmt: skip
            _ = logits[0, 1].numpy()
        times.append(time.perf_counter() - start)
    model_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return {"seconds": min(times), "work_mb": _peak_mb() - base_mb, "model_mb": model_mb}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_side(side: str, shape: list[int], backbone: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--backbone", backbone]
    command += ["--repeats", str(repeats)]
    command += ["--shapes", "x".join(map(str, shape))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["160x160x320", "96x96x192"])
    parser.add_argument("--backbone", default="unet_tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="volumes per process")
    parser.add_argument("--worker", choices=["ours", "bare", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [[int(n) for n in text.split("x")] for text in args.shapes]
    if args.worker:
        print(json.dumps(_worker(args.worker, shapes[0], args.backbone, args.repeats)))
        return
    sides = [
        "bare",
        "ours",
        *(["bf16"] if effective_precision("bf16-mixed", "cpu") != "32-true" else []),
    ]
    if "bf16" not in sides:
        print("no fast bfloat16 kernels on this CPU: the bf16 side is left out")
    print(
        f"{args.backbone}, roi {ROI}, overlap {OVERLAP}, sw batch {SW_BATCH}, 2 channels, "
        f"2 classes; fastest of {args.repeats} volumes per process x {args.rounds} rotating "
        "rounds"
    )
    header = (
        f"{'shape':>14}{'bare s':>9}{'ours s':>9}{'time x':>8}"
        f"{'floor MB':>10}{'bare MB':>9}{'ours MB':>9}{'mem x':>7}"
        + (f"{'bf16 s':>9}{'bf16 x':>8}" if "bf16" in sides else "")
    )
    print(header)
    worst_time = worst_memory = worst_bf16 = 0.0
    for shape in shapes:
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for round_index in range(args.rounds):
            # No side always runs first or last (warmer file caches): rotate the order.
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                runs[side].append(_run_side(side, shape, args.backbone, args.repeats))
        bare = min(runs["bare"], key=lambda r: r["seconds"])
        ours = min(runs["ours"], key=lambda r: r["seconds"])
        bare_mb = min(r["work_mb"] for r in runs["bare"])
        ours_mb = min(r["work_mb"] for r in runs["ours"])
        voxels = int(np.prod(shape))
        # What any whole-volume inference holds: 2-channel input, 2-class output, the network.
        floor_mb = voxels * 4 * (2 + 2) / 2**20 + bare["model_mb"]
        time_ratio = ours["seconds"] / bare["seconds"]
        memory_ratio = ours_mb / bare_mb
        worst_time, worst_memory = max(worst_time, time_ratio), max(worst_memory, memory_ratio)
        row = (
            f"{'x'.join(map(str, shape)):>14}{bare['seconds']:9.2f}{ours['seconds']:9.2f}"
            f"{time_ratio:7.2f}x{floor_mb:10.0f}{bare_mb:9.0f}{ours_mb:9.0f}{memory_ratio:6.2f}x"
        )
        if "bf16" in sides:
            bf16 = min(r["seconds"] for r in runs["bf16"])
            worst_bf16 = max(worst_bf16, bf16 / ours["seconds"])
            row += f"{bf16:9.2f}{bf16 / ours['seconds']:7.2f}x"
        print(row)
    print(f"predict memory ratio: {worst_memory:.2f}x")
    print(f"predict ratio: {worst_time:.2f}x")
    if "bf16" in sides:
        print(f"bf16 predict ratio: {worst_bf16:.2f}x")


if __name__ == "__main__":
    main()
