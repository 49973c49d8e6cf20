"""Two-process gloo DDP on CPU: synced lesion metrics equal the single-process result, also when
one rank saw no case at all and when a rank holds a padded duplicate case."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sap_lightning.metrics import make_lesion_metrics

pytestmark = pytest.mark.distributed

SPACING = (1.5, 2.0, 4.0)
SHAPE = (24, 22, 12)
THRESHOLDS = (0.25, 0.5, 0.75)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    extent = np.array(SHAPE) * np.array(SPACING)
    gt = np.zeros(SHAPE, dtype=bool)
    prob = np.zeros(SHAPE, dtype=np.float32)
    for k in range(3):
        center = rng.uniform(0.2, 0.8, 3) * extent
        radii = rng.uniform(3.0, 7.0, 3)
        gt |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
        shift = center + rng.normal(0, 2.0, 3) if k < 2 else rng.uniform(0.1, 0.9, 3) * extent
        d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, shift, radii))
        prob = np.maximum(prob, rng.uniform(0.3, 1.0) * np.exp(-d2))
    return prob.astype(np.float32), gt


CASE_IDS = [f"case_{k}" for k in range(5)]

SCENARIOS = {
    # rank -> the cases it evaluates
    "one_rank_empty": [CASE_IDS, []],
    "padded_duplicate": [CASE_IDS[0::2], [*CASE_IDS[1::2], CASE_IDS[0]]],
}


def _evaluate(case_ids: list[str]) -> dict:
    metrics = make_lesion_metrics(threshold=0.5, froc_thresholds=THRESHOLDS)
    for case_id in case_ids:
        prob, gt = _case(CASE_IDS.index(case_id))
        metrics.update(torch.from_numpy(prob), torch.from_numpy(gt), SPACING, case_id=case_id)
    values = {k: float(v) for k, v in metrics.compute().items()}
    cases = metrics["detection"].case_table().drop(columns="case_id")
    lesions = metrics["segmentation"].lesion_table().drop(columns="case_id")
    return {
        "values": {k: (None if math.isnan(v) else v) for k, v in values.items()},
        "cases": sorted(map(str, cases.round(6).to_numpy().tolist())),
        "lesions": sorted(map(str, lesions.round(6).to_numpy().tolist())),
    }


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    try:
        for scenario, per_rank in SCENARIOS.items():
            result = _evaluate(per_rank[rank])
            with open(os.path.join(out_dir, f"{scenario}_rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_synced_metrics_equal_single_process(tmp_path):
    # fork: the children reuse the imported libraries (CPU only, no CUDA state to inherit)
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    expected = _evaluate(CASE_IDS)
    assert expected["values"]["n_cases"] == len(CASE_IDS)
    for scenario in SCENARIOS:
        for rank in range(2):
            got = json.loads((tmp_path / f"{scenario}_rank{rank}.json").read_text())
            assert got["cases"] == expected["cases"], (scenario, rank)
            assert got["lesions"] == expected["lesions"], (scenario, rank)
            assert got["values"].keys() == expected["values"].keys()
            for key, value in expected["values"].items():
                assert got["values"][key] == pytest.approx(value, abs=1e-6), (scenario, rank, key)
