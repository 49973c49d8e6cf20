"""Checkpoints and batches on a cluster: ``last.ckpt`` on a time interval, a requeued job whose
first attempt left no checkpoint, Lightning's requeue checkpoints, and the per-process batch
derived from ``trainer.global_batch_size``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sap_lightning.config import load_config
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.run_layout import LAUNCH_FILE, resume_checkpoint_path
from sap_lightning.pipeline import train
from sap_lightning.pipeline.launch import per_process_batch
from sap_lightning.pipeline.train import run_training
from tests.datasets import write_tiny_dataset
from tests.training import EXPERIMENTS, TINY_TRAINING

CONFIG = EXPERIMENTS / "cpu" / "finetune_scratch.yaml"
LAUNCHER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(
        tmp_path_factory.mktemp("ckpt") / "lesion", n_cases=9, shape=(32, 32, 48), seed=4
    )


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No launcher's variables; one torch thread (the tiny network gains nothing from more)."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARIABLES):
            monkeypatch.delenv(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(dataset: Path, run_dir: Path, *overrides: str):
    return load_config(
        CONFIG,
        [
            *TINY_TRAINING, "logger=none", f"data.dataset={dataset}", f"run_dir={run_dir}",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "task=lesion",
            "trainer.max_epochs=1", "trainer.max_steps=-1", "optim.warmup_steps=0",
            "trainer.precision=32-true", "validation.precision=32-true",
            *overrides,
        ],
    )  # fmt: skip


def _last_checkpoint_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The global step of every ``last.ckpt`` written from now on."""
    steps: list[int] = []
    save = train.AtomicCheckpointIO.save_checkpoint

    def recording(self: Any, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        if Path(path).name == "last.ckpt":
            steps.append(int(checkpoint["global_step"]))
            time.sleep(0.01)  # the next step starts past any interval below
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(train.AtomicCheckpointIO, "save_checkpoint", recording)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize(
    ("minutes", "expected"),
    [
        (None, [3, 6]),  # after every epoch (the default)
        (1e-4, [1, 2, 3, 4, 5, 6]),  # every training step outlasts 6 ms
        (60.0, [6]),  # the interval never passes: once, when training ends
    ],
)
def test_last_checkpoint_follows_the_time_interval(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minutes, expected
) -> None:
    writes = _last_checkpoint_writes(monkeypatch)
    every = "null" if minutes is None else str(minutes)
    cfg = _config(dataset, tmp_path / "run", "trainer.max_epochs=2",
                  f"trainer.checkpoint_every_minutes={every}", "validation.every_n_epochs=2")  # fmt: skip
    result = run_training(cfg)
    assert writes == expected
    assert result.last_checkpoint is not None and result.last_checkpoint.is_file()


@pytest.mark.slow
def test_a_requeued_job_without_a_checkpoint_starts_its_run_over(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM requeued the job before its first checkpoint: its folder holds what the first
    attempt wrote (config, launch record), no checkpoint. The same command starts over there;
    another job's folder in that state is refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("from the first attempt\n")
    (run_dir / "csv").mkdir()
    (run_dir / LAUNCH_FILE).write_text(json.dumps({"job_id": "slurm:77"}))
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost",
             "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    for name, value in {**slurm, "SLURM_JOB_ID": "78"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(_config(dataset, run_dir))
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    result = run_training(_config(dataset, run_dir))
    assert result.last_checkpoint is not None
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["task"] == "lesion"
    assert not (run_dir / "config.resume1.yaml").exists()  # a new start, not a resume
    assert json.loads((run_dir / LAUNCH_FILE).read_text())["restarts"] == 1


def test_the_newest_of_last_and_lightnings_requeue_checkpoint_is_resumed(tmp_path: Path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint_path(tmp_path) == last  # nothing yet: last.ckpt's path
    last.parent.mkdir()
    last.write_bytes(b"epoch")
    assert resume_checkpoint_path(tmp_path) == last
    for number, age in ((2, 50), (10, 20)):
        hpc = tmp_path / f"hpc_ckpt_{number}.ckpt"
        hpc.write_bytes(b"signal")
        os.utime(hpc, ns=(time.time_ns() - age * 10**9,) * 2)
    os.utime(last, ns=(time.time_ns() - 30 * 10**9,) * 2)
    assert resume_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"  # newest number
    os.utime(last, None)
    assert resume_checkpoint_path(tmp_path) == last


@pytest.mark.parametrize(
    ("world", "accumulate", "batch"), [(1, 1, 4), (2, 1, 2), (4, 1, 1), (2, 2, 1)]
)
def test_the_global_batch_is_kept_on_any_gpu_count(world: int, accumulate: int, batch: int):
    cfg = load_config(
        "experiments/paper/finetune_scratch.yaml",
        [f"trainer.accumulate_grad_batches={accumulate}", f"trainer.devices={world}"],
    )
    assert cfg.trainer.global_batch_size == 4 and cfg.trainer.devices == world
    assert per_process_batch(cfg, world).data.batch_size == batch


def test_a_global_batch_that_does_not_split_is_refused_in_one_line() -> None:
    cfg = load_config("experiments/paper/finetune_scratch.yaml", [])
    with pytest.raises(ConfigError) as caught:
        per_process_batch(cfg, 8)
    assert str(caught.value) == (
        "trainer.global_batch_size=4 does not split over 8 process(es) x 1 accumulated "
        "batch(es): use a multiple of 8 (and scale the learning rates) or another trainer.devices"
    )
    unset = load_config(None, ["trainer.global_batch_size=null", "data.batch_size=3"])
    assert per_process_batch(unset, 8).data.batch_size == 3
