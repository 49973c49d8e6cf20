"""The training loader under real DDP: 2 CPU processes (gloo) through ``lightning.Trainer`` with
``strategy="ddp"`` and ``use_distributed_sampler=False``, over three epochs.

Checked per epoch from what each rank's training_step received: the ranks' shares of the plan
are disjoint and cover it, every lesion is the positive of exactly one patch, the shares change
from epoch to epoch and both ranks run the same number of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.config import load_config
from tests.datasets import write_tiny_dataset

WORKER = Path(__file__).with_name("_loader_worker.py")
EPOCHS = 3
OVERRIDES = [
    "task=lesion",
    "data.n_folds=3",
    "data.fold=1",
    "data.tuning_fold=0",
    "data.patch_size=[8,8,8]",
    "data.batch_size=2",
    "data.queue_length=4",
    "data.num_workers=1",
    "seed=3",
]

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _lesions(dataset: Path, case_ids: list[str]) -> Counter:
    """Lesions per training case, counted with scipy on the NIfTI labels (6-connectivity)."""
    structure = ndimage.generate_binary_structure(3, 1)
    counts = Counter()
    for case_id in case_ids:
        label = np.asanyarray(nib.load(dataset / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        counts[case_id] = ndimage.label(label > 0, structure)[1]
    return counts


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Counter]:
    base = tmp_path_factory.mktemp("ddp")
    dataset = write_tiny_dataset(
        base / "lesion", n_cases=9, shape=(24, 20, 16), lesions_per_case=[3, 2, 1, 3, 0, 2, 1, 3, 2]
    )
    datamodule = build_datamodule(load_config(None, [f"data.dataset={dataset}", *OVERRIDES]))
    datamodule.prepare_data()  # cache and splits, before the ranks start
    out = base / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(dataset), str(out), *OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return records, _lesions(dataset, datamodule.train_case_ids)


def _share(record: dict, epoch: int, kind: str | None = None) -> list:
    return [s["index"] for s in record["seen"] if s["epoch"] == epoch and kind in (None, s["kind"])]


def test_both_ranks_ran_the_same_steps_on_the_same_plans(ddp_run):
    (rank0, rank1), _ = ddp_run
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["steps_per_epoch"] == rank1["steps_per_epoch"] > 0
    for epoch in map(str, range(EPOCHS)):
        assert rank0["steps"][epoch] == rank1["steps"][epoch] == rank0["steps_per_epoch"]
        assert rank0["plans"][epoch] == rank1["plans"][epoch]
    assert all(s["plan_epoch"] == s["epoch"] for r in (rank0, rank1) for s in r["seen"])


def test_shares_are_disjoint_and_cover_the_plan_every_epoch(ddp_run):
    (rank0, rank1), _ = ddp_run
    for epoch in range(EPOCHS):
        share0, share1 = _share(rank0, epoch), _share(rank1, epoch)
        assert len(share0) == len(share1) == len(set(share0)) == len(set(share1))
        assert not set(share0) & set(share1)
        assert sorted(share0 + share1) == list(range(len(rank0["plans"][str(epoch)])))


def test_every_lesion_is_seen_exactly_once_per_epoch(ddp_run):
    (rank0, rank1), lesions = ddp_run
    for epoch in range(EPOCHS):
        positives = Counter(
            (s["case_id"], s["target"])
            for r in (rank0, rank1)
            for s in r["seen"]
            if s["epoch"] == epoch and s["kind"] == "positive"
        )
        assert set(positives.values()) == {1}
        assert Counter(case for case, _ in positives) == +lesions


def test_shares_change_between_epochs(ddp_run):
    (rank0, _), _ = ddp_run
    lesion_shares = [
        {
            (s["case_id"], s["target"])
            for s in rank0["seen"]
            if s["epoch"] == e and s["kind"] == "positive"
        }
        for e in range(EPOCHS)
    ]
    assert lesion_shares[0] != lesion_shares[1] != lesion_shares[2]
    locations = [
        {tuple(s["location"]) for s in rank0["seen"] if s["epoch"] == e} for e in range(EPOCHS)
    ]
    assert locations[0] != locations[1]
