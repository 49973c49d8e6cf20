"""Who launched this process, and how the processes of a run agree on how it starts.

**Who launches** is read as Lightning reads it (``_AcceleratorConnector``): the first of
TorchElastic (torchrun), SLURM, LSF and MPI whose ``detect()`` is true, else Lightning's own
environment. SLURM is ignored for a job named ``bash`` or ``interactive`` (``srun --pty bash``):
there Lightning starts the extra processes itself with ``LOCAL_RANK``, and the inherited
``SLURM_PROCID=0`` must not make each of them the run's first process.

**Starting together.** Under torchrun, SLURM, LSF or MPI every process starts at once; under
Lightning's launcher one process per node starts and creates the others when training begins.
The processes present at the start (:attr:`Launch.participants`) agree through a TCP store on
the address and port the process group will use (``MASTER_ADDR``/``MASTER_PORT``, SLURM's
node list and job id): global rank 0 hosts it as a multi-tenant store, so the process group
later reuses the same server (under torchrun the agent's store is used). In order:

1. rank 0 checks the run folder and decides whether to resume (``resume=true``, or a requeued
   job continuing its own run); the first process of every node validates the dataset and
   builds its cache and splits (node-local storage: one per node; shared: the cache's lock
   lets one build and the others reuse it);
2. every process builds its data module, module and Trainer and reports ready with a digest of
   the cache and splits it reads (nodes that would train on different data are refused);
3. only then does rank 0 write the run folder.

A process that fails at any step publishes its one-line reason, and every other process stops
with it within a second (a rank 0 that dies is noticed at once: its store goes with it);
none waits for a process group that will never form. Lightning's launcher hands the decision
to the processes it creates in an environment variable (:data:`DECISION_ENV`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap_lightning.config.schema import ExperimentConfig, TrainerConfig
from sap_lightning.core.errors import ConfigError, SapError

log = logging.getLogger(__name__)

DECISION_ENV = "SAP_START_DECISION"
"""How a launching process hands its start decision to the processes Lightning creates."""
CONNECT_TIMEOUT_S = 45.0
"""How long a process waits for rank 0's store to appear (it starts it before any work)."""
PREPARE_TIMEOUT_S = 4 * 3600.0
"""How long processes wait for their node's cache (a large cohort takes a while to build)."""
STEP_TIMEOUT_S = 600.0
"""How long processes wait for rank 0's decision and its writes."""
JOIN_TIMEOUT_S = 120.0
"""How long rank 0 waits for every process to reach the store (launchers start them together)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run, known before Lightning sets up distributed training."""

    launcher: str
    """``torchrun``, ``slurm``, ``lsf``, ``mpi`` or ``lightning``."""
    external: bool
    """Every process was started by the launcher (False: Lightning's launcher creates the
    others of each node when training starts)."""
    global_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    num_nodes: int
    job_id: str | None
    """The job that requeues keep (SLURM's job id, a named torchrun rendezvous)."""
    restarts: int
    """``SLURM_RESTART_COUNT`` / ``TORCHELASTIC_RESTART_COUNT``: 0 for a first start."""
    child: bool = False
    """Created by Lightning's launcher from a launching process of this library."""
    environment: Any = None
    """Lightning's cluster environment object (address and port of rank 0)."""

    @property
    def primary(self) -> bool:
        """The run's first process: it decides how the run starts and writes the run folder."""
        return self.global_rank == 0

    @property
    def node_primary(self) -> bool:
        """The first process of its node: it prepares the node's cache and splits."""
        return self.local_rank == 0

    @property
    def participants(self) -> int:
        """Processes present when the command starts."""
        return self.world_size if self.external else self.num_nodes

    @property
    def participant(self) -> int:
        return self.global_rank if self.external else self.node_rank

    @property
    def local_world_size(self) -> int:
        """Processes of the run on this node."""
        return max(1, self.world_size // max(1, self.num_nodes))

    def describe(self) -> str:
        return (
            f"{self.launcher} rank {self.global_rank}/{self.world_size} (node {self.node_rank}, "
            f"local rank {self.local_rank})"
        )


def _cluster_environment() -> Any:
    """The cluster environment Lightning's Trainer chooses, in its order."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for kind in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if kind.detect():
            try:
                return kind()
            except (RuntimeError, ValueError) as err:  # e.g. srun --ntasks without per-node
                raise ConfigError(f"{kind.__name__}: {err}") from None
    return LightningEnvironment()


LAUNCHERS = {
    "TorchElasticEnvironment": "torchrun",
    "SLURMEnvironment": "slurm",
    "LSFEnvironment": "lsf",
    "MPIEnvironment": "mpi",
}


def devices_per_node(accelerator: str, devices: Any) -> int:
    """The processes Lightning runs per node for ``trainer.accelerator`` / ``trainer.devices``
    (its accelerators' own parsing: ``auto``, a count, a list or ``"0,1"``)."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

    kinds: dict[str, Any] = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator}
    kind = kinds.get(accelerator)
    if accelerator in ("gpu", "auto"):
        kind = next(
            (k for k in (CUDAAccelerator, MPSAccelerator) if k.is_available()),
            CPUAccelerator if accelerator == "auto" else CUDAAccelerator,
        )
    if kind is None:
        return 1  # another accelerator: Lightning checks it when the Trainer is built
    flag = kind.auto_device_count() if devices == "auto" else devices
    try:
        return max(1, len(kind.get_parallel_devices(kind.parse_devices(flag))))
    except Exception as err:  # Lightning's MisconfigurationException and friends
        raise ConfigError(
            f"trainer.devices={devices!r} (accelerator {accelerator}): {err}"
        ) from None


def _job() -> tuple[str | None, int]:
    """The job's identity that a requeue keeps, and how often it was restarted."""
    env = os.environ
    restarts = max(
        int(env.get("SLURM_RESTART_COUNT", 0)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    )
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}", restarts
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # torchrun's unnamed rendezvous is "none" for every job
        return f"torchrun:{run_id}", restarts
    if env.get("LSB_JOBID"):
        return f"lsf:{env['LSB_JOBID']}", restarts
    return None, restarts


def detect_launch(trainer: TrainerConfig) -> Launch:
    """This process's :class:`Launch`, as Lightning will see it."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = _cluster_environment()
    job_id, restarts = _job()
    nodes = int(trainer.num_nodes)
    if not isinstance(environment, LightningEnvironment):
        world = int(environment.world_size())
        return Launch(
            LAUNCHERS[type(environment).__name__], True, int(environment.global_rank()),
            int(environment.local_rank()), int(environment.node_rank()), world, nodes,
            job_id, restarts, environment=environment,
        )  # fmt: skip
    per_node = devices_per_node(trainer.accelerator, trainer.devices)
    world = per_node * nodes
    local = int(environment.local_rank())
    node = int(environment.node_rank())
    child = environment.creates_processes_externally and _decision_from_parent() is not None
    return Launch(
        "lightning", bool(environment.creates_processes_externally), node * per_node + local,
        local, node, world, nodes, job_id, restarts, child=child, environment=environment,
    )  # fmt: skip


def is_launching_process() -> bool:
    """True in the process that starts a run (global rank 0), before Lightning sets up."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = _cluster_environment()
    if isinstance(environment, LightningEnvironment):
        return environment.local_rank() == 0 and environment.node_rank() == 0
    return int(environment.global_rank()) == 0


def share_node_cpus(launch: Launch) -> int | None:
    """Give each of a node's processes its share of the node's CPUs; returns the threads set.

    Every process sizes torch's thread pool to the CPUs it may use (``core/threads.py``). When
    the launcher did not bind each process to CPUs of its own (SLURM without CPU binding,
    processes started by hand), N processes of a node would each start a thread per CPU of the
    node and spin against each other; each then takes 1/N of them. ``SAP_NUM_THREADS`` /
    ``OMP_NUM_THREADS`` (torchrun and Lightning's launcher set it) keep their count.
    """
    import torch

    from sap_lightning.core.threads import ENV_OVERRIDE, usable_cpus

    if (
        launch.local_world_size <= 1
        or os.environ.get(ENV_OVERRIDE)
        or os.environ.get("OMP_NUM_THREADS")
    ):
        return None
    usable = usable_cpus()
    if usable < (os.cpu_count() or usable):
        return None  # bound to some CPUs already (cpuset, taskset, SLURM's binding)
    threads = max(1, usable // launch.local_world_size)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
        log.info(
            "%d processes on this node: torch uses %d threads each",
            launch.local_world_size,
            threads,
        )
    return threads


def per_process_batch(cfg: ExperimentConfig, world_size: int) -> ExperimentConfig:
    """``cfg`` with ``data.batch_size`` derived from ``trainer.global_batch_size`` for
    ``world_size`` processes (unchanged without a global batch); an uneven split is refused."""
    total = cfg.trainer.global_batch_size
    if total is None:
        return cfg
    share = world_size * cfg.trainer.accumulate_grad_batches
    if total % share:
        raise ConfigError(
            f"trainer.global_batch_size={total} does not split over {world_size} process(es) x "
            f"{cfg.trainer.accumulate_grad_batches} accumulated batch(es): use a multiple of "
            f"{share} (and scale the learning rates) or another trainer.devices"
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=total // share))


def check_world_size(trainer: Any, launch: Launch) -> None:
    """The processes the launcher started must be the ones the Trainer will use."""
    expected = int(trainer.num_devices) * int(trainer.num_nodes)
    if expected != launch.world_size:
        raise ConfigError(
            f"{launch.launcher} runs {launch.world_size} process(es), but trainer.devices x "
            f"trainer.num_nodes = {trainer.num_devices} x {trainer.num_nodes}: make them agree "
            "(under SLURM, --ntasks-per-node = trainer.devices and --nodes = trainer.num_nodes)"
        )


# --------------------------------------------------------------------------------------------
# Decision handed to Lightning's child processes


def _decision_from_parent() -> dict[str, Any] | None:
    raw = os.environ.get(DECISION_ENV)
    if not raw:
        return None
    try:
        decision = json.loads(raw)
    except ValueError:
        return None
    # A variable left from another run of this process (sap study runs several) is not ours.
    return decision if decision.get("pid") == os.getppid() else None


@contextmanager
def decision_for_children(decision: dict[str, Any]) -> Iterator[None]:
    """Make ``decision`` visible to the processes Lightning's launcher creates in the block."""
    os.environ[DECISION_ENV] = json.dumps({**decision, "pid": os.getpid()})
    try:
        yield
    finally:
        os.environ.pop(DECISION_ENV, None)


# --------------------------------------------------------------------------------------------
# The start store


class StartFailed(SapError):
    """Another process of the run could not start (its reason is the message)."""


def describe_error(err: BaseException) -> str:
    """One line for an error, as the command line would print it."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


_STORES: list[Any] = []
"""Rank 0's start store, kept for the life of the process: the process group reuses its server."""
_STARTS: list[str] = []
"""The key prefixes of this process's starts so far."""


class StartChannel:
    """The processes of a run at start, talking through a TCP store (module docstring)."""

    def __init__(self, launch: Launch) -> None:
        import torch.distributed as dist

        self.launch = launch
        self.index = launch.participant
        self.count = launch.participants
        self.host = socket.gethostname()
        address, port = self._endpoint()
        hosts = self.index == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        # Every process counts its runs alike (a driver may train twice in one process).
        self.prefix = f"sap-start/{launch.restarts}/{len(_STARTS)}/"
        _STARTS.append(self.prefix)
        try:
            self.store = dist.TCPStore(
                address, port, None, hosts,
                timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S),
                wait_for_workers=False, multi_tenant=True,
            )  # fmt: skip
        except (RuntimeError, OSError) as err:
            where = "open" if hosts else "reach"
            raise SapError(
                f"{launch.describe()} could not {where} the start store at {address}:{port} "
                f"within {CONNECT_TIMEOUT_S:.0f} s ({describe_error(err)}); rank 0 did not start "
                "or the address is not reachable (check MASTER_ADDR / MASTER_PORT)"
            ) from None
        self.hosts = hosts
        if hosts:
            _STORES.append(self.store)
        self.put(f"joined{self.index}", self.host)

    def check_everyone_joined(self) -> None:
        """Rank 0: refuse the start when a process never reached the store."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for other in range(1, self.count):
            remaining = max(1.0, deadline - time.monotonic())
            try:
                self.get(f"joined{other}", f"process {other} to start", remaining)
            except StartFailed:
                raise
            except SapError:
                raise SapError(
                    f"process {other} of {self.count} ({self.launch.launcher}) did not start "
                    f"within {JOIN_TIMEOUT_S:.0f} s; see its log (or the launcher's)"
                ) from None

    def _endpoint(self) -> tuple[str, int]:
        environment = self.launch.environment
        if self.launch.launcher == "lightning":
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise ConfigError(
                    f"trainer.num_nodes={self.launch.num_nodes} with Lightning's own launcher: set "
                    f"{' and '.join(missing)} (node 0's address and a free port) on every node"
                )
        return str(environment.main_address), int(environment.main_port)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def put(self, name: str, value: Any) -> None:
        self.store.set(self._key(name), json.dumps(value))

    def fail(self, message: str) -> None:
        """Tell every process why this one cannot start (the first reason is kept)."""
        reason = json.dumps(
            {"rank": self.launch.global_rank, "host": self.host, "message": message}
        )
        try:
            self.store.compare_set(self._key("failed"), "", reason)
            if self.hosts:  # the store dies with this process: let the others read it first
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:
                    if int(self.store.add(self._key("failed-seen"), 0)) >= self.count - 1:
                        break
                    time.sleep(0.1)
        except Exception:
            log.debug("could not publish the start failure", exc_info=True)

    def _raise_failure(self) -> None:
        reason = json.loads(self.store.get(self._key("failed")))
        self.store.add(self._key("failed-seen"), 1)
        raise StartFailed(
            f"rank {reason['rank']} on {reason['host']} cannot start: {reason['message']}"
        )

    def get(self, name: str, what: str, timeout_s: float = STEP_TIMEOUT_S) -> Any:
        """Wait for ``name`` (or another process's failure) and return its value."""
        deadline = time.monotonic() + timeout_s
        key, failed = self._key(name), self._key("failed")
        announced = False
        try:
            while True:
                if self.store.check([failed]):
                    self._raise_failure()
                if self.store.check([key]):
                    return json.loads(self.store.get(key))
                if time.monotonic() > deadline:
                    raise SapError(f"waited {timeout_s:.0f} s for {what}; giving up")
                if not announced:
                    log.info("waiting for %s", what)
                    announced = True
                time.sleep(0.2)
        except (RuntimeError, OSError) as err:  # DistNetworkError: rank 0 and its store are gone
            raise StartFailed(
                f"rank 0's process stopped while {self.launch.describe()} waited for {what} "
                f"({describe_error(err)}); its log has the reason"
            ) from None


class Start:
    """The start protocol of one process (module docstring); without a channel (one process at
    start, or a process Lightning created) every step is local."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.channel = (
            StartChannel(launch) if launch.participants > 1 and not launch.child else None
        )

    @contextmanager
    def step(self) -> Iterator[None]:
        """Publish any error raised in the block to the other processes, then raise it."""
        try:
            yield
        except BaseException as err:
            if self.channel is not None and not isinstance(err, StartFailed):
                self.channel.fail(describe_error(err))
            raise

    def decision(self, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Rank 0's decision (``decide()`` there), known to every process."""
        if self.launch.child:
            decision = _decision_from_parent()
            assert decision is not None
            return decision
        with self.step():
            if self.launch.primary:
                decision = decide()
                if self.channel is not None:
                    self.channel.check_everyone_joined()
                    self.channel.put("decision", decision)
                return decision
            assert self.channel is not None
            return self.channel.get("decision", "rank 0 to check the run folder")

    def prepare_node(self, prepare: Callable[[], None]) -> None:
        """``prepare()`` in the first process of each node; the others wait for their node."""
        if self.launch.child:
            return
        with self.step():
            if self.launch.node_primary:
                prepare()
                if self.channel is not None:
                    self.channel.put(f"node{self.launch.node_rank}", "ready")
            elif self.channel is not None:
                self.channel.get(
                    f"node{self.launch.node_rank}",
                    f"node {self.launch.node_rank}'s first process to prepare the cache and splits",
                    PREPARE_TIMEOUT_S,
                )

    def ready(self, digest: str) -> None:
        """Wait until every process is ready; refuse processes that read other data."""
        if self.channel is None:
            return
        with self.step():
            self.channel.put(f"ready{self.channel.index}", digest)
            if self.channel.index == 0:
                for other in range(1, self.channel.count):  # maybe still building its cache
                    theirs = self.channel.get(
                        f"ready{other}", f"process {other} to be ready", PREPARE_TIMEOUT_S
                    )
                    if theirs != digest:
                        raise SapError(
                            f"process {other} reads another cache or splits than rank 0 ({theirs} "
                            f"against {digest}): node-local caches must be built from the same "
                            "dataset with the same settings"
                        )
                self.channel.put("all-ready", True)
            else:
                self.channel.get("all-ready", "every process to be ready", PREPARE_TIMEOUT_S)

    def started(self) -> None:
        """Rank 0 has written the run folder (the others wait for it before training)."""
        if self.channel is None:
            return
        with self.step():
            if self.channel.index == 0:
                self.channel.put("written", True)
            else:
                self.channel.get("written", "rank 0 to write the run folder")


def data_digest(*paths: Path) -> str:
    """A short digest of the files a process trains from (cache description, splits)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]
