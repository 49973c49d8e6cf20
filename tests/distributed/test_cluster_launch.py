"""Who launches a run, decided as Lightning decides it, and runs started the way cluster launchers
start them: SLURM batch jobs on two nodes (node-local caches, requeue, a foreign job, a node that
cannot prepare), an interactive SLURM shell, torchrun, and a non-finite loss on one rank.

Every run is a real ``sap finetune`` (or the training entry point) in separate processes with
the variables those launchers set; gloo DDP on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from sap_lightning.config import load_config
from sap_lightning.core.errors import SapError
from sap_lightning.core.mixed_precision import training_precision
from sap_lightning.pipeline.launch import (
    Launch,
    detect_launch,
    devices_per_node,
    share_node_cpus,
)
from tests.datasets import write_tiny_dataset
from tests.distributed._cluster import (
    FAST,
    LAUNCHER_VARIABLES,
    REPO,
    base_env,
    finetune,
    free_port,
    run_together,
    slurm_env,
)

WITHIN_A_MINUTE = 60.0

SLURM_BATCH = {"SLURM_JOB_ID": "31", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4",
               "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
               "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODELIST": "n[1-2]",
               "MASTER_PORT": "29555"}  # fmt: skip
SLURM_SHELL = {"SLURM_JOB_ID": "32", "SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "1",
               "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_NODELIST": "n1"}  # fmt: skip
TORCHRUN = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
            "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29556"}  # fmt: skip

# environment, devices, nodes -> launcher, external, global rank, local rank, node rank, world
CASES = {
    "plain command": ({}, 2, 1, ("lightning", False, 0, 0, 0, 2)),
    "slurm batch, node 1": (SLURM_BATCH, 2, 2, ("slurm", True, 3, 1, 1, 4)),
    "interactive slurm shell": (SLURM_SHELL, 2, 1, ("lightning", False, 0, 0, 0, 2)),
    "its second process": (
        {**SLURM_SHELL, "LOCAL_RANK": "1", "NODE_RANK": "0"},
        2,
        1,
        ("lightning", True, 1, 1, 0, 2),
    ),
    "torchrun": (TORCHRUN, 2, 2, ("torchrun", True, 3, 1, 1, 4)),
    "torchrun inside slurm": ({**SLURM_BATCH, **TORCHRUN}, 2, 2, ("torchrun", True, 3, 1, 1, 4)),
    "lightning, node 1 of 2": (
        {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29557"},
        2,
        2,
        ("lightning", False, 2, 0, 1, 4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_launch_is_read_as_lightning_reads_it(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    variables, devices, nodes, expected = CASES[case]
    # A Trainer built under another rank's variables sets the rank-zero-only rank: restored.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for name in [name for name in os.environ if name.startswith(LAUNCHER_VARIABLES)]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(
        None,
        ["trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"],
    )
    launch = detect_launch(cfg.trainer)
    seen = (launch.launcher, launch.external, launch.global_rank, launch.local_rank,
            launch.node_rank, launch.world_size)  # fmt: skip
    assert seen == expected
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, num_nodes=nodes, strategy="ddp", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    environment = trainer.strategy.cluster_environment
    assert environment.creates_processes_externally == launch.external
    assert launch.launcher == {"LightningEnvironment": "lightning", "SLURMEnvironment": "slurm",
                               "TorchElasticEnvironment": "torchrun"}[type(environment).__name__]  # fmt: skip
    # The rank Lightning gives this process when it sets up DDP (DDPStrategy.set_world_ranks).
    assert trainer.node_rank * trainer.num_devices + trainer.local_rank == launch.global_rank
    assert trainer.num_devices * trainer.num_nodes == launch.world_size
    assert launch.primary == (expected[2] == 0)


def test_unbound_processes_of_a_node_share_its_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sap_lightning.core import threads

    monkeypatch.delenv("SAP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 16)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(16)
        four_per_node = Launch("slurm", True, 5, 1, 1, 8, 2, "slurm:1", 0)
        assert share_node_cpus(four_per_node) == 4 and torch.get_num_threads() == 4
        assert share_node_cpus(Launch("lightning", False, 0, 0, 0, 1, 1, None, 0)) is None
        monkeypatch.setattr(os, "cpu_count", lambda: 64)  # bound to 16 of 64 CPUs: kept
        assert share_node_cpus(four_per_node) is None
        monkeypatch.setenv("SAP_NUM_THREADS", "2")
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        assert share_node_cpus(four_per_node) is None
    finally:
        torch.set_num_threads(before)


def test_a_process_that_never_starts_is_named_by_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from sap_lightning.pipeline import launch as launch_module

    monkeypatch.setattr(launch_module, "JOIN_TIMEOUT_S", 1.0)
    endpoint = SimpleNamespace(main_address="127.0.0.1", main_port=free_port())
    alone = Launch("slurm", True, 0, 0, 0, 2, 1, "slurm:9", 0, environment=endpoint)
    channel = launch_module.StartChannel(alone)
    with pytest.raises(SapError, match=r"^process 1 of 2 \(slurm\) did not start within 1 s"):
        channel.check_everyone_joined()


def test_device_counts_follow_lightnings_parsing() -> None:
    assert devices_per_node("cpu", 3) == 3
    assert devices_per_node("cpu", "auto") == 1
    assert devices_per_node("auto", "2") == 2
    with pytest.raises(Exception, match=r"trainer.devices=0"):
        devices_per_node("cpu", 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(
        tmp_path_factory.mktemp("cluster") / "lesion", n_cases=9, shape=(32, 32, 96), seed=2
    )


def _assert_ok(results: list) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"


@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_two_nodes_node_local_caches_requeue_and_a_foreign_job(
    dataset: Path, tmp_path: Path
) -> None:
    """Two nodes with one task each, each node's cache on its own storage; then the job is
    requeued (continues its run) and another job is pointed at the same folder (refused on
    both ranks, nothing changed)."""
    run_dir = tmp_path / "run"
    command = finetune(dataset, run_dir, "trainer.devices=1", "trainer.num_nodes=2",
                       "trainer.global_batch_size=2")  # fmt: skip

    def launch(job: str, restarts: int) -> list:
        port = free_port()
        envs = [
            slurm_env(
                rank,
                2,
                2,
                job,
                port,
                SAP_PREPROCESSED=str(tmp_path / f"node{rank}"),
                SLURM_RESTART_COUNT=str(restarts),
            )
            for rank in (0, 1)
        ]
        return run_together([command, command], envs, tmp_path)

    first = launch("101", 0)
    _assert_ok(first)
    assert first[0].stdout.count("run folder:") == 1 and "run folder:" not in first[1].stdout
    for node in (0, 1):  # each node built its own cache and splits, from the same dataset
        assert (tmp_path / f"node{node}" / "lesion" / "cache" / "cache.json").is_file()
        assert (tmp_path / f"node{node}" / "lesion" / "splits.json").is_file()
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["launcher"] == "slurm" and record["job_id"] == "slurm:101"
    assert record["world_size"] == 2 and record["batch_size_per_process"] == 1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 1  # global batch 2 over 2 processes
    # The precision it trained at (bf16-mixed, or float32 on a CPU without bfloat16 kernels).
    assert saved["trainer"]["precision"] == training_precision("bf16-mixed", "cpu")

    requeued = launch("101", 1)
    _assert_ok(requeued)
    assert "continuing its run" in requeued[0].stderr
    assert (run_dir / "config.resume1.yaml").is_file()
    assert json.loads((run_dir / "launch.json").read_text())["restarts"] == 1

    before = sorted(p.name for p in run_dir.iterdir())
    foreign = launch("202", 1)
    assert all(r.returncode == 2 for r in foreign), [r.stderr[-2000:] for r in foreign]
    assert all(r.seconds < WITHIN_A_MINUTE for r in foreign)
    assert "already holds a run" in foreign[0].error_line()
    assert foreign[1].error_line().startswith("sap finetune: error: rank 0 on ")
    assert "already holds a run" in foreign[1].error_line()
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.distributed
@pytest.mark.slow
def test_a_node_that_cannot_build_its_cache_stops_every_rank(dataset: Path, tmp_path: Path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    run_dir = tmp_path / "run"
    command = finetune(dataset, run_dir, "trainer.devices=1", "trainer.num_nodes=2")
    port = free_port()
    storage = [tmp_path / "node0", blocker / "node1"]  # node 1 cannot create its cache folder
    envs = [slurm_env(r, 2, 2, "303", port, SAP_PREPROCESSED=str(storage[r])) for r in (0, 1)]
    results = run_together([command, command], envs, tmp_path)
    assert [r.returncode for r in results] == [2, 1]
    assert all(r.seconds < WITHIN_A_MINUTE for r in results)
    assert "Not a directory" in results[1].error_line()
    line = results[0].error_line()
    assert line.startswith("sap finetune: error: rank 1 on ") and "not_a_folder" in line
    assert not run_dir.exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_runs_two_processes(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]  # fmt: skip
    command = finetune(dataset, run_dir, "trainer.devices=2")[1:]  # after the interpreter
    (result,) = run_together([command], [base_env()], tmp_path, prefix=torchrun)
    _assert_ok([result])
    assert result.stdout.count("run folder:") == 1
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["launcher"] == "torchrun" and record["world_size"] == 2


NAN_DRIVER = """
import sys
from lightning.pytorch.callbacks import Callback
from sap_lightning.config import load_config
from sap_lightning.core.errors import SapError
from sap_lightning.core.mixed_precision import training_precision
from sap_lightning.core.errors import SapError
from sap_lightning.pipeline.train import run_training

class PoisonRankOne(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            batch["image"].fill_(float("nan"))

cfg = load_config(sys.argv[1], [*sys.argv[2:], "task=lesion"])
try:
    run_training(cfg, extra_callbacks=[PoisonRankOne()])
except SapError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both(dataset: Path, tmp_path: Path) -> None:
    """SLURM tasks (gloo): rank 1's loss is NaN; rank 0 must stop at the same step with a
    line naming rank 1, not go on into an all-reduce that rank 1 never joins."""
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    args = [str(REPO / "experiments/cpu/finetune_scratch.yaml"), *FAST, "trainer.devices=2",
            f"data.dataset={dataset}", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    port = free_port()
    envs = [slurm_env(rank, 2, 1, "404", port) for rank in (0, 1)]
    command = [sys.executable, str(driver), *args]
    results = run_together([command, command], envs, tmp_path)
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
    assert "not finite on rank(s) [1] at global step 0" in results[0].error_line()
    assert "training loss is nan on rank 1 at global step 0" in results[1].error_line()
    assert "cases " in results[1].error_line()


def test_launch_describes_itself() -> None:
    launch = Launch("slurm", True, 3, 1, 1, 4, 2, "slurm:1", 0)
    assert launch.describe() == "slurm rank 3/4 (node 1, local rank 1)"
    assert (launch.participants, launch.participant, launch.local_world_size) == (4, 3, 2)
    spawning = Launch("lightning", False, 2, 0, 1, 4, 2, None, 0)
    assert (spawning.participants, spawning.participant, spawning.node_primary) == (2, 1, True)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_interactive_slurm_shell_trains_two_processes_in_64mb_of_shared_memory(
    dataset: Path, tmp_path: Path
) -> None:
    """``srun --pty bash`` then ``sap finetune trainer.devices=2``: Lightning starts the second
    process itself (it ignores SLURM for a job named bash); inside a private mount namespace
    whose /dev/shm is Docker's default 64 MB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("a private /dev/shm needs root (unshare -m)")
    run_dir = tmp_path / "run"
    command = finetune(dataset, run_dir, "trainer.devices=2", "data.num_workers=1")
    env = base_env(**{k: v for k, v in SLURM_SHELL.items()})
    script = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)  # fmt: skip
    if "unshare failed" in done.stderr or "mount:" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["launcher"] == "lightning" and record["world_size"] == 2
