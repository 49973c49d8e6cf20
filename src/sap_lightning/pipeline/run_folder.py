"""The run folder at start: refuse a used one, resume one (``resume=true``), or continue a
requeued job's own run; and the files a start writes there.

A new run never writes into a folder that already holds files: it stops and says so (pass
``resume=true`` to continue that run, or choose another ``name`` / ``run_dir``). Versioning the
folder instead was rejected because under DDP every rank re-executes the command and must find
the same folder. The one exception is a job started again by its scheduler with the same command
(SLURM's requeue after a preemption: ``SLURM_RESTART_COUNT`` > 0, or torchrun restarting its
workers): when ``launch.json`` names that same job, the run continues from its newest checkpoint,
or starts over in its folder when it had none yet.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sap_lightning.backbones.checkpoints import load_checkpoint_file
from sap_lightning.config import ExperimentConfig, save_config
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.io import read_json, write_json
from sap_lightning.core.run_layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAUNCH_FILE,
    last_checkpoint_path,
    resume_checkpoint_path,
)
from sap_lightning.pipeline.launch import Launch

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: ExperimentConfig) -> Path:
    """``cfg.run_dir``, or ``<output_dir>/<name>``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.output_dir) / cfg.name


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Refuse to start over an existing run; for ``resume`` return the checkpoint to resume.

    The checkpoint to resume is read once here (``weights_only=True``), so a truncated or
    unsafe file is refused with its name before anything in the folder changes.
    """
    if resume:
        checkpoint = resume_checkpoint_path(run_dir)
        if not checkpoint.is_file():
            raise ConfigError(
                f"resume=true but {checkpoint} does not exist: nothing to resume in {run_dir} "
                "(drop resume=true to start a new run in an empty folder)"
            )
        load_checkpoint_file(checkpoint)
        return checkpoint
    if run_dir.exists() and any(run_dir.iterdir()):
        content = ", ".join(sorted(p.name for p in run_dir.iterdir())[:6])
        unfinished = (
            ""
            if last_checkpoint_path(run_dir).is_file()
            else " It has no checkpoint (its run stopped before finishing an epoch): delete "
            "the folder to start over."
        )
        raise ConfigError(
            f"run folder {run_dir} already holds a run ({content}); pass resume=true to "
            f"continue it, or choose another 'name' or 'run_dir' (nothing was changed).{unfinished}"
        )
    return None


def started_by(run_dir: Path) -> str | None:
    """The job recorded in the folder's ``launch.json`` (None: none recorded, or unreadable)."""
    try:
        record = read_json(run_dir / LAUNCH_FILE)
    except (OSError, ValueError):
        return None
    job = record.get("job_id") if isinstance(record, dict) else None
    return str(job) if job else None


def decide_start(cfg: ExperimentConfig, run_dir: Path, launch: Launch) -> dict[str, Any]:
    """How rank 0 starts the run: ``{"resume_from": path or None, "requeued": bool}``.

    A requeued job whose own run is in the folder resumes it (from its newest checkpoint) or,
    when the first attempt ended before any checkpoint, starts it over there; everything else is
    :func:`check_run_dir`'s.
    """
    own = (
        not cfg.resume
        and launch.restarts > 0
        and launch.job_id is not None
        and started_by(run_dir) == launch.job_id
    )
    if not own:
        resume_from = check_run_dir(run_dir, cfg.resume)
        return {"resume_from": None if resume_from is None else str(resume_from), "requeued": False}
    checkpoint = resume_checkpoint_path(run_dir)
    if checkpoint.is_file():
        load_checkpoint_file(checkpoint)
        log.warning(
            "requeued job %s (restart %d): continuing its run in %s from %s",
            launch.job_id, launch.restarts, run_dir, checkpoint.name,
        )  # fmt: skip
        return {"resume_from": str(checkpoint), "requeued": True}
    log.warning(
        "requeued job %s (restart %d): its run in %s has no checkpoint yet; starting it over",
        launch.job_id, launch.restarts, run_dir,
    )  # fmt: skip
    return {"resume_from": None, "requeued": True, "start_over": True}


def clear_run_dir(run_dir: Path) -> None:
    """Empty a requeued job's own folder that holds no checkpoint (what its first attempt wrote)."""
    for entry in run_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def save_run_config(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """``config.yaml`` for a new run; ``config.resume<N>.yaml`` for the N-th resume."""
    target = run_dir / CONFIG_FILE
    if cfg.resume:
        number = 1
        while (run_dir / f"config.resume{number}.yaml").exists():
            number += 1
        target = run_dir / f"config.resume{number}.yaml"
    return save_config(cfg, target)


def write_launch_record(run_dir: Path, launch: Launch, batch_size: int) -> Path:
    """``launch.json``: who started the run (a requeue compares ``job_id``) on what."""
    return write_json(
        run_dir / LAUNCH_FILE,
        {
            "launcher": launch.launcher,
            "job_id": launch.job_id,
            "restarts": launch.restarts,
            "world_size": launch.world_size,
            "num_nodes": launch.num_nodes,
            "batch_size_per_process": batch_size,
        },
    )


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed job left behind.

    They are hidden (``.last.ckpt.tmp-<pid>``, see ``AtomicCheckpointIO``), never read, and as
    large as a checkpoint.
    """
    folder = run_dir / CHECKPOINT_DIR
    leftovers = sorted(folder.glob(".*.ckpt.tmp-*")) if folder.is_dir() else []
    leftovers += sorted(run_dir.glob(".hpc_ckpt_*.ckpt.tmp-*"))
    for path in leftovers:
        log.info("removing %s, left by an interrupted checkpoint write", path)
        path.unlink(missing_ok=True)
    return leftovers
