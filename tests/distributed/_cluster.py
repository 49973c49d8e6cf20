"""Launch ``sap finetune`` processes as cluster launchers do, on this machine's CPUs.

SLURM is simulated by the variables ``srun`` sets for each task (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``, ...): Lightning and the library read
nothing else. Every process gets its own ``MASTER_PORT`` (one free port per launch), as SLURM's
job id would give a real job.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.tiny import TINY_NETWORK

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "cpu" / "finetune_scratch.yaml"
FAST = [
    "trainer.enable_progress_bar=false",
    TINY_NETWORK,
    "data.samples_per_volume=1",
    "data.queue_length=4",
    "data.n_folds=3",
    "validation.every_n_epochs=1",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "trainer.strategy=ddp",
]
"""One training step and one validation case of the tiny U-Net per run."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LAUNCHER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK",
                      "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_", "SAP_START_DECISION", "PL_")  # fmt: skip
"""Prefixes of what launchers (and Lightning's launcher) set."""


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def slurm_env(
    rank: int, ntasks: int, nodes: int, job_id: str, port: int, **extra: str
) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of a batch job (``--ntasks-per-node``)."""
    per_node = ntasks // nodes
    return base_env(
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="train",
        SLURM_NTASKS=str(ntasks),
        SLURM_NTASKS_PER_NODE=str(per_node),
        SLURM_NNODES=str(nodes),
        SLURM_NODEID=str(rank // per_node),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank % per_node),
        SLURM_NODELIST=",".join(["localhost"] * nodes),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **extra,
    )


def finetune(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "sap_lightning", "finetune", "--config", str(CONFIG), *FAST,
        f"data.dataset={dataset}", f"run_dir={run_dir}", *overrides,
    ]  # fmt: skip


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_line(self) -> str:
        """The last line of stderr (the command line's one-line error)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_together(
    commands: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str]],
    cwd: Path,
    timeout: float = 240,
    prefix: Sequence[str] = (),
) -> list[Finished]:
    """Start every command at once (as srun starts its tasks) and wait for all of them."""
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            [*prefix, *command],
            env=dict(env),
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for command, env in zip(commands, envs)
    ]
    finished = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        finished.append(Finished(process.returncode, out, err, time.monotonic() - start))
    return finished
