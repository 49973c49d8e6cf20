"""The files of a run folder: one place for their names, used by training, inference,
evaluation and the study driver.

    config.yaml              the resolved configuration
    checkpoints/last.ckpt    the model after the last finished epoch (the one the paper uses)
    checkpoints/best.ckpt    the best epoch by the module's monitored validation value
    backbone.pt              pretraining runs: the exported network with its metadata
    transfer_report.json     fine-tuning runs: what was initialised from where
    evaluation/              fine-tuning runs: the last validation, in ``sap evaluate``'s layout
    threshold.json           the tuned threshold ``sap predict`` applies
    launch.json              how the run was last started (launcher, job, processes)
    hpc_ckpt_<N>.ckpt        Lightning's checkpoint on SLURM's requeue signal (``--signal``)
"""

from __future__ import annotations

import os
from pathlib import Path

from sap_lightning.core.errors import SapError
from sap_lightning.core.io import read_json

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
BACKBONE_FILE = "backbone.pt"
TRANSFER_REPORT = "transfer_report.json"
EVALUATION_DIR = "evaluation"
THRESHOLD_FILE = "threshold.json"
LAUNCH_FILE = "launch.json"
"""The launcher and job that last started the run: a requeued job continues only its own run."""
HPC_CHECKPOINT_PREFIX = "hpc_ckpt_"
"""Lightning's SLURM auto-requeue checkpoints (``hpc_ckpt_<N>.ckpt`` in the run folder)."""
WANDB_ID_FILE = "wandb_run_id.txt"
"""The W&B run id of the run folder, so a resumed run continues the same W&B run."""


def last_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def resume_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """The checkpoint a resumed run continues from: the newer of ``last.ckpt`` and Lightning's
    latest ``hpc_ckpt_<N>.ckpt`` (written when SLURM signals a requeue, after the last epoch's
    ``last.ckpt``); ``last.ckpt``'s path when neither exists."""
    last = last_checkpoint_path(run_dir)
    candidates = [last] if last.is_file() else []
    hpc = [
        p
        for p in Path(run_dir).glob(f"{HPC_CHECKPOINT_PREFIX}*.ckpt")
        if p.stem[len(HPC_CHECKPOINT_PREFIX) :].isdigit()
    ]
    if hpc:
        candidates.append(max(hpc, key=lambda p: int(p.stem[len(HPC_CHECKPOINT_PREFIX) :])))
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else last


def load_threshold(path: str | os.PathLike) -> float:
    """The threshold stored by ``evaluation.threshold.save_threshold`` (or any JSON ``{"threshold": t}``)."""
    path = Path(path)
    try:
        raw = read_json(path)
    except FileNotFoundError as err:
        raise SapError(f"{path}: no threshold file (write one with sap evaluate --tune)") from err
    except (OSError, ValueError) as err:
        raise SapError(f"{path}: unreadable threshold file ({err})") from err
    value = raw.get("threshold") if isinstance(raw, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise SapError(f"{path}: 'threshold' must be a number in (0, 1], got {value!r}")
    return float(value)


def run_checkpoint(path: str | os.PathLike) -> Path:
    """The weights a path stands for: a file as it is; a run folder by its ``last.ckpt``
    (the model the paper uses), else its exported ``backbone.pt``."""
    path = Path(path)
    if not path.is_dir():
        return path
    for candidate in (last_checkpoint_path(path), path / BACKBONE_FILE):
        if candidate.is_file():
            return candidate
    raise SapError(
        f"{path}: run folder without {CHECKPOINT_DIR}/{LAST_CHECKPOINT} or {BACKBONE_FILE}"
    )
