"""Inference cost of ``sap predict`` versus bare MONAI ``sliding_window_inference``.

Both sides run the same network with the same windows, overlap and Gaussian blending on one
whole-body-sized two-channel volume; ours adds what ``sap predict`` does around it (whole-volume
normalisation, softmax, CPU stitching). Each side runs in its own process so peak memory (max
RSS) is its own. Ends with ``predict ratio: R.RRx`` (our time over bare; target <= 1.10x).

    python benchmarks/bench_predict.py [--shape 160 160 320] [--backbone unet_tiny]
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

ROI = [64, 64, 64]
OVERLAP = 0.25
SW_BATCH = 2


def _network(backbone: str) -> torch.nn.Module:
    from sap_lightning.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(backbone, 2, 2).eval()


def _volume(shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.gamma(2.0, 100.0, size=(2, *shape)).astype(np.float32)


def _worker(side: str, shape: list[int], backbone: str, repeats: int) -> dict:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    net = _network(backbone)
    raw = _volume(shape)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if side == "ours":
            from sap_lightning.cache import prepare_image
            from sap_lightning.core.windows import predict_volume

            normed, _, _ = prepare_image(raw, np.eye(4))
            probs = predict_volume(
                net, torch.from_numpy(normed)[None], ROI, sw_batch_size=SW_BATCH, overlap=OVERLAP
            )
            _ = probs[0, 1].numpy()
        else:
            from monai.inferers import sliding_window_inference

            with torch.no_grad():
                logits = sliding_window_inference(
                    torch.from_numpy(raw)[None],
                    ROI,
                    SW_BATCH,
                    net,
                    overlap=OVERLAP,
                    mode="gaussian",
                )
            _ = logits[0, 1].numpy()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 320])
    parser.add_argument("--backbone", default="unet_tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.shape, args.backbone, args.repeats)))
        return
    results = {}
    for side in ("bare", "ours"):
        command = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--shape",
            *map(str, args.shape),
            "--backbone",
            args.backbone,
            "--repeats",
            str(args.repeats),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(output.strip().splitlines()[-1])
    voxels = int(np.prod(args.shape))
    print(
        f"volume {args.shape} ({voxels / 1e6:.1f} M voxels, 2 channels), {args.backbone}, "
        f"roi {ROI}, overlap {OVERLAP}, best of {args.repeats}"
    )
    print(f"{'':24}{'seconds':>10}{'peak MB':>10}")
    print(
        f"{'bare MONAI sliding window':24}{results['bare']['seconds']:10.2f}"
        f"{results['bare']['peak_mb']:10.0f}"
    )
    print(
        f"{'sap predict inference':24}{results['ours']['seconds']:10.2f}"
        f"{results['ours']['peak_mb']:10.0f}"
    )
    print(f"memory ratio: {results['ours']['peak_mb'] / results['bare']['peak_mb']:.2f}x")
    print(f"predict ratio: {results['ours']['seconds'] / results['bare']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
