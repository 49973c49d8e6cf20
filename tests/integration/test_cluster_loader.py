"""The loaders on a GPU node: the patch queue refills ahead of need, an epoch cut short leaves
nothing behind, whole cases cross shared memory with a uint8 label, and the shared memory they
need is what is checked at start (a 64 MB ``/dev/shm`` refuses the paper's settings in one
line, in a private mount namespace, through the real command line)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.batches.patches import WholeCaseDataset
from sap_lightning.batches.queue import LOADER_PREFETCH
from sap_lightning.batches.shared_memory import (
    check_shared_memory,
    suggested_shm_size,
    training_need,
)
from sap_lightning.config import load_config
from sap_lightning.core.errors import ConfigError
from tests.datasets import write_tiny_dataset

QUEUE = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_tiny_dataset(
        tmp_path_factory.mktemp("feed") / "lesion", n_cases=6, shape=(24, 20, 16),
        lesions_per_case=[3, 2, 3, 2, 3, 2],
    )  # fmt: skip
    build_datamodule(_config(root, 0)).prepare_data()
    return root


def _config(root: Path, workers: int):
    return load_config(
        None,
        [
            "task=lesion", f"data.dataset={root}", "data.n_folds=3", "data.fold=1",
            "data.tuning_fold=0", "data.patch_size=[8,8,8]", "data.batch_size=2",
            f"data.queue_length={QUEUE}", f"data.num_workers={workers}", "seed=7",
        ],
    )  # fmt: skip


def _datamodule(root: Path, workers: int):
    datamodule = build_datamodule(_config(root, workers))
    datamodule.setup("fit")
    return datamodule


def _locations(batches) -> list[list[int]]:
    return [row for batch in batches for row in batch["location"].tolist()]


def test_the_queue_refills_while_the_training_step_runs(dataset: Path) -> None:
    """After one batch is popped the queue is full again without being asked: TorchIO's queue
    refills only when empty, with the training step waiting."""
    datamodule = _datamodule(dataset, workers=1)
    try:
        datamodule.set_train_epoch(0)
        assert len(datamodule.queue) >= QUEUE + 2  # more than a queue left after one batch
        batches = iter(datamodule.train_dataloader())
        next(batches)
        deadline = time.monotonic() + 30
        while datamodule.queue.num_patches < QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)  # "the training step": nobody pops
        assert datamodule.queue.num_patches == QUEUE
    finally:
        datamodule.queue.close()


def test_an_epoch_cut_short_leaves_no_patch_to_the_next(dataset: Path) -> None:
    """``limit_train_batches``: epoch 0 stops after one batch, the feed holds patches of it;
    epoch 1's batches must be exactly those cut without workers."""
    reference = _datamodule(dataset, workers=0)
    reference.set_train_epoch(1)
    expected = _locations(reference.train_dataloader())
    datamodule = _datamodule(dataset, workers=2)
    try:
        loader = datamodule.train_dataloader()
        datamodule.set_train_epoch(0)
        next(iter(loader))
        datamodule.set_train_epoch(1)
        assert _locations(loader) == expected
    finally:
        datamodule.queue.close()


def test_the_ring_is_the_shared_memory_counted_at_start(dataset: Path) -> None:
    datamodule = _datamodule(dataset, workers=2)
    try:
        need = datamodule.shared_memory_need()
        datamodule.set_train_epoch(0)
        next(iter(datamodule.train_dataloader()))
        ring = datamodule.queue._ring
        assert ring is not None and ring.label is not None
        assert ring.label.dtype == torch.uint8  # patch labels cross as cached
        assert need.ring_bytes == ring.image.nbytes + ring.label.nbytes
        assert need.validation_items == LOADER_PREFETCH + 1
        case = WholeCaseDataset(datamodule.store, datamodule.val_case_ids, with_label=True)[0]
        crossing = sum(case[k].nbytes for k in ("image", "label", "body"))
        assert need.validation_item_bytes == crossing  # the largest case is this size here
    finally:
        datamodule.queue.close()


def test_whole_cases_cross_with_a_uint8_label_and_arrive_as_int64(dataset: Path) -> None:
    datamodule = _datamodule(dataset, workers=1)
    sample = WholeCaseDataset(datamodule.store, datamodule.val_case_ids, with_label=True)[0]
    assert sample["label"].dtype == torch.uint8  # what the worker puts in shared memory
    for batch in datamodule.val_dataloader():
        assert batch["label"].dtype == torch.int64
        case = datamodule.store.get(batch["case_id"][0])
        assert torch.equal(batch["label"][0, 0], torch.from_numpy(np.array(case.label)).long())


def test_too_little_shared_memory_is_refused_with_the_size_and_the_fix(tmp_path: Path) -> None:
    paper = training_need(2, (96, 96, 96), 1, 2, 32, 4, 192 * 192 * 384 * 10)
    assert paper.ring_slots == 43 and round(paper.patch_bytes / 2**20, 1) == 7.6
    with pytest.raises(ConfigError) as caught:
        check_shared_memory(paper, processes=2, path=tmp_path, free_bytes=64 * 2**20)
    line = str(caught.value)
    assert "\n" not in line and "this node's 2 processes need" in line
    assert f"--shm-size={suggested_shm_size(2 * paper.total_bytes)}" in line
    assert "--ipc=host" in line
    check_shared_memory(paper, processes=1, path=tmp_path, free_bytes=2 * paper.total_bytes)
    assert training_need(2, (96,) * 3, 1, 2, 32, 0, 10**9).total_bytes == 0  # no workers


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_the_paper_settings_in_a_64mb_container_are_refused_at_start(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a private /dev/shm needs root (unshare -m)")
    dataset = write_tiny_dataset(tmp_path / "lesion", n_cases=6, shape=(32, 32, 48), seed=1)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "sap_lightning", "finetune", "--config",
        str(REPO / "experiments/cpu/finetune_scratch.yaml"), f"data.dataset={dataset}",
        "data.n_folds=3", f"run_dir={run_dir}", "data.patch_size=[96,96,96]",
        "data.num_workers=4", "data.queue_length=32", "logger=csv",
    ]  # fmt: skip
    script = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"'
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        "WANDB_MODE": "disabled",
    }
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)  # fmt: skip
    if "unshare failed" in done.stderr or "mount:" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("sap finetune: error: shared memory: this process needs ")
    assert "/dev/shm" in line and "--shm-size=" in line and "--ipc=host" in line
    assert "patch ring 43 x 7.6 MiB" in line
    assert not run_dir.exists()
