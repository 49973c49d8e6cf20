"""Loader workers write patches into a shared-memory ring (``batches/queue.py``): the batches
must be exactly those cut in the main process, over several epochs and many reuses of every
slot, with augmentations on, and each patch must equal the cache's window at its location."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.cache.reader import open_cache
from sap_lightning.config import load_config
from sap_lightning.core.threads import single_threaded_children, worker_processes
from tests.datasets import write_tiny_dataset

EPOCHS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_tiny_dataset(
        tmp_path_factory.mktemp("ring") / "lesion", n_cases=6, shape=(24, 20, 16),
        lesions_per_case=[2, 1, 3, 2, 1, 2],
    )  # fmt: skip
    build_datamodule(_config(root, "data.num_workers=0")).prepare_data()
    return root


def _config(root: Path, *overrides: str):
    return load_config(
        None,
        [
            "task=lesion",
            f"data.dataset={root}",
            "data.n_folds=3",
            "data.fold=1",
            "data.tuning_fold=0",
            "data.patch_size=[8,8,8]",
            "data.batch_size=2",
            "data.queue_length=3",  # a ring of a few slots: each is reused many times
            "seed=5",
            *overrides,
        ],
    )


def _batches(root: Path, workers: int, augment: bool) -> list[dict]:
    off = ["data.augment.flip_p=0", "data.augment.rot90_p=0", "data.augment.intensity_p=0"]
    extra = [] if augment else off
    dm = build_datamodule(_config(root, f"data.num_workers={workers}", *extra))
    dm.setup("fit")
    batches = []
    for epoch in range(EPOCHS):
        dm.set_train_epoch(epoch)
        batches += [dict(batch, epoch=epoch) for batch in dm.train_dataloader()]
    if workers:
        ring = dm.queue._ring
        assert ring is not None and len(batches) * 2 > 2 * ring.image.shape[0]  # wrapped around
    return batches


@pytest.mark.parametrize("augment", [False, True])
def test_worker_batches_equal_main_process_batches_over_epochs(dataset: Path, augment: bool):
    main = _batches(dataset, 0, augment)
    workers = _batches(dataset, 2, augment)
    assert len(main) == len(workers) > 0
    for a, b in zip(main, workers):
        assert a["case_id"] == b["case_id"]
        assert torch.equal(a["task_index"], b["task_index"])
        assert torch.equal(a["location"], b["location"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    epochs = {e: [b["location"].tolist() for b in workers if b["epoch"] == e] for e in (0, 1)}
    assert epochs[0] != epochs[1]  # the workers followed the new epoch's plan


def test_unaugmented_worker_patches_are_the_cache_windows(dataset: Path):
    dm = build_datamodule(_config(dataset, "data.num_workers=1"))
    cache = open_cache(dm.cache_root)
    for batch in _batches(dataset, 1, augment=False):
        for image, label, case_id, location in zip(
            batch["image"], batch["label"], batch["case_id"], batch["location"]
        ):
            case = cache.load(case_id)
            lo, hi = location[:3].tolist(), location[3:].tolist()
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            if all(a >= 0 for a in lo) and all(b <= n for b, n in zip(hi, case.image.shape[1:])):
                np.testing.assert_array_equal(image.numpy(), case.image[(..., *window)])
                np.testing.assert_array_equal(label[0].numpy(), case.label[window])


def test_worker_processes_get_one_thread_and_the_parent_keeps_its_environment(monkeypatch):
    import json
    import os
    import subprocess
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # set by the user: kept
    names = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
    probe = f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {names}}}))"
    with single_threaded_children():  # a child started here, as the spawn pool's workers are
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    seen = json.loads(out.stdout)
    assert seen["OMP_NUM_THREADS"] == "1" and seen["OPENBLAS_NUM_THREADS"] == "1"
    assert seen["MKL_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"
    assert worker_processes(10_000) == worker_processes(os.cpu_count() or 1) >= 1
    assert worker_processes(1) == 1
