"""Training runs: run folder, logger, callbacks, Trainer, resume, export. One entry point,
:func:`run_training`, serves ``sap pretrain``, ``sap ssl`` and ``sap finetune``.

A run folder (``run_dir``, default ``<output_dir>/<name>``) holds::

    config.yaml              the resolved configuration of the run (config.resume<N>.yaml per resume)
    launch.json              how it was last started (launcher, job, processes, batch per process)
    checkpoints/last.ckpt    the model after the last finished epoch (the one the paper uses);
                             written after every training epoch (or every
                             ``trainer.checkpoint_every_minutes``), atomically, so a job killed at
                             any moment resumes from its last checkpoint
    checkpoints/best.ckpt    the best epoch by the module's monitored validation value
    backbone.pt              pretraining runs: the exported network with its metadata
    transfer_report.json     fine-tuning runs: what was initialised from where
    csv/ or wandb/           logs (``logger=csv`` / ``logger=wandb``)

A new run never writes into a folder that already holds files (``pipeline/run_folder.py``:
``resume=true`` continues one, and a requeued job continues its own).

Distributed training (``trainer.devices=N`` / ``trainer.num_nodes=M`` with ``trainer.strategy=ddp``)
runs the command in every process, however it was launched (torchrun, SLURM, Lightning's own
launcher: ``pipeline/launch.py``). The processes agree on how the run starts before anything is
written, rank 0 alone writes the folder, and the data module shards the data itself (the
Trainer is built with ``use_distributed_sampler=False``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sap_lightning.backbones import get_spec
from sap_lightning.batches.planners import PLANNERS
from sap_lightning.config import ExperimentConfig
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.io import atomic_path, write_json, write_text
from sap_lightning.core.mixed_precision import training_precision
from sap_lightning.core.run_layout import (
    BACKBONE_FILE,
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    EVALUATION_DIR,
    LAST_CHECKPOINT,
    TRANSFER_REPORT,
    WANDB_ID_FILE,
    last_checkpoint_path,
)
from sap_lightning.core.tasks import get_task
from sap_lightning.evaluation.case_pictures import draw_validation_case
from sap_lightning.evaluation.predictions import (
    EvaluationSettings,
    summarize_metrics,
    write_evaluation,
)
from sap_lightning.inference.pictures import b1000_channel_of
from sap_lightning.modules import SapModule, build_module, data_info_from
from sap_lightning.modules.lesion import LesionSegmentation
from sap_lightning.modules.losses import LOSSES
from sap_lightning.modules.optim import OPTIMIZERS
from sap_lightning.pipeline import wandb_log
from sap_lightning.pipeline.launch import (
    Launch,
    Start,
    check_world_size,
    data_digest,
    decision_for_children,
    detect_launch,
    is_launching_process,
    per_process_batch,
    share_node_cpus,
)
from sap_lightning.pipeline.run_folder import (
    clear_run_dir,
    decide_start,
    remove_partial_checkpoints,
    resolve_run_dir,
    save_run_config,
    write_launch_record,
)

log = logging.getLogger(__name__)


UNSUPPORTED_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
"""Launchers that copy the in-memory objects of the launching process into its workers."""
"""Pretraining tasks: their backbone is exported at the end of training."""


@dataclass
class RunResult:
    """Where a finished run left its outputs, and the final logged values (rank 0)."""

    run_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    backbone: Path | None = None
    transfer_report: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    is_global_zero: bool = True
    """False in the extra processes of a DDP run (they report nothing)."""


# --------------------------------------------------------------------------------------------
# Checkpoints, logger, callbacks, Trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a hidden temporary name in its own folder, then renames it.

    Lightning's own writer stages the file in the system temporary folder and moves it into
    place: where that folder is another file system (node-local ``/tmp``, shared run folders)
    the move is a copy, and a job killed during it leaves a truncated ``last.ckpt``; every kill
    also strands a checkpoint-sized file in ``/tmp``. A rename within one folder is atomic, and
    the data is flushed to disk before it, so ``last.ckpt`` is always a complete checkpoint.
    Remote URLs keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage (s3://, ...)
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


def _wandb_run_id(run_dir: Path, primary: bool) -> str | None:
    """The run folder's W&B id: created with the folder (rank 0 writes it with the rest of the
    folder), reused on resume. Under a W&B sweep agent the agent's ``WANDB_RUN_ID`` is used, so
    the run reports to its sweep."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not primary:
        return None  # only the launching process talks to W&B
    return os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]  # lowercase + digits


def build_logger(cfg: ExperimentConfig, run_dir: Path, primary: bool = True) -> Logger | None:
    """W&B (offline by default; ``wandb sync`` uploads later), CSV, or none.

    The W&B API key is never read here: W&B takes ``WANDB_API_KEY`` from the environment
    itself when a run is synced or online.
    """
    if cfg.logger == "none":
        return None
    if cfg.logger == "csv":
        # A new version folder per (re)start: CSVLogger deletes metrics.csv in a reused one.
        return CSVLogger(save_dir=run_dir, name="csv")
    wandb_cfg = cfg.wandb
    return WandbLogger(
        name=cfg.name,
        save_dir=str(run_dir),
        id=_wandb_run_id(run_dir, primary),
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group,
        tags=list(wandb_cfg.tags),
        mode=wandb_mode(wandb_cfg.mode),
    )


def wandb_mode(configured: str | None) -> str:
    """``wandb.mode`` when set; else the user's ``WANDB_MODE``; else ``online`` under a sweep
    agent (its controller needs the metrics) and ``offline`` otherwise (no login needed)."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_SWEEP_ID") else "offline"


def build_callbacks(
    module: SapModule, run_dir: Path, datamodule: Any, logger: Logger | None
) -> list[Callback]:
    """Checkpoints (last after every epoch or every ``trainer.checkpoint_every_minutes``, best
    by the module's monitor), the data module's epoch callback and, with a logger, the
    learning-rate monitor."""
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    minutes = module.cfg.trainer.checkpoint_every_minutes
    callbacks: list[Callback] = [
        # last.ckpt as the one "top-k" file of an unmonitored checkpoint, saved at the end of
        # every training epoch. (``save_last=True`` with ``save_top_k=0`` writes it only when
        # training ends, so a killed job would lose every epoch.)
        LastCheckpoint(
            dirpath=checkpoint_dir,
            filename=Path(LAST_CHECKPOINT).stem,
            monitor=None,
            save_top_k=1,
            every_n_epochs=None if minutes else 1,
            train_time_interval=timedelta(minutes=minutes) if minutes else None,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        ),
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename=Path(BEST_CHECKPOINT).stem,
            monitor=module.monitor,
            mode=module.monitor_mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
    ]
    extra = datamodule.callbacks()
    callbacks += list(extra) if isinstance(extra, Sequence) else [extra]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return callbacks


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: Lightning's checkpoint, which on a time interval also writes the final
    model when training ends (its timer alone would leave the last minutes unsaved)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timed = self._train_time_interval is not None
        if (
            timed
            and not trainer.interrupted
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_checkpoint(trainer, self.format_checkpoint_name({}))
            self._last_global_step_saved = trainer.global_step


def _check_strategy(cfg: ExperimentConfig) -> None:
    if cfg.trainer.strategy in UNSUPPORTED_STRATEGIES:
        raise ConfigError(
            f"'trainer.strategy' {cfg.trainer.strategy!r} is not supported: use 'ddp' (or "
            "'auto'), which starts every process from the command line, as the run folder "
            "handling and the data module's sharding expect"
        )


def build_trainer(
    cfg: ExperimentConfig, run_dir: Path, logger: Logger | None, callbacks: list[Callback]
) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` (DDP: ``strategy=ddp``, gloo on CPU, NCCL on GPU)."""
    _check_strategy(cfg)
    try:
        return _trainer(cfg, run_dir, logger, callbacks)
    except (MisconfigurationException, ValueError) as err:  # devices the node lacks, and such
        raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None


def _trainer(
    cfg: ExperimentConfig, run_dir: Path, logger: Logger | None, callbacks: list[Callback]
) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        # A step budget is enforced by the StepBudget callback, not Lightning's max_steps: with
        # max_steps set, a run resumed from an end-of-epoch checkpoint redoes that epoch.
        max_epochs=t.max_epochs,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        check_val_every_n_epoch=cfg.validation.every_n_epochs,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        # Patch shapes are fixed, so letting cuDNN pick its fastest kernels once pays off.
        benchmark=not t.deterministic,
        fast_dev_run=t.fast_dev_run,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        # The data module gives each rank its own shard (and pads them to equal length).
        use_distributed_sampler=False,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
    )


# --------------------------------------------------------------------------------------------
# Entry point


def _build_datamodule(cfg: ExperimentConfig, primary: bool) -> Any:
    """The task's data module, its cache and splits ready, on a dataset that passed its check.

    ``primary``: this process checks the dataset and builds what is missing (the first process
    of each node does: ``pipeline/launch.py``); the others wait for the files it writes.
    """
    from sap_lightning.batches.datamodule import build_datamodule
    from sap_lightning.cache import CACHE_JSON
    from sap_lightning.dataset.validate import require_valid_dataset

    datamodule = build_datamodule(cfg)
    if primary:
        if not Path(cfg.data.dataset).is_dir():
            raise ConfigError(
                f"'data.dataset' is {cfg.data.dataset}: no such dataset folder (give the nnU-Net "
                "raw folder with dataset.json, imagesTr and labelsTr)"
            )
        # Validated once per command: nothing trains on a dataset broken since it was cached,
        # and building the cache or splits below reuses this result.
        datamodule.dataset_info = require_valid_dataset(
            cfg.data.dataset,
            require_labels=cfg.task != "ssl",
            workers=max(1, cfg.data.num_workers),
            task=datamodule.dataset_task,  # the experiment's task reads an ambiguous label set
        )
        datamodule.prepare_cache_and_splits()  # builds the cache and splits.json when missing
    else:
        _wait_for(
            [datamodule.cache_root / CACHE_JSON, datamodule.splits_path],
            "the node's first process to build the preprocessing cache and splits",
        )
    return datamodule


PREPARE_TIMEOUT_S = 4 * 3600.0
"""How long non-launching processes wait for the cache (a large cohort takes a while)."""


def _wait_for(paths: Sequence[Path], what: str, timeout_s: float = PREPARE_TIMEOUT_S) -> None:
    """Block until every path exists (they are written atomically), or fail clearly."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            missing = ", ".join(str(p) for p in paths if not p.exists())
            raise ConfigError(
                f"waited {timeout_s:.0f} s for {what}; still missing: {missing} (run sap "
                "preprocess and sap split once before a multi-node job)"
            )
        if not announced:
            log.info("waiting for %s", what)
            announced = True
        time.sleep(2.0)


def check_registered_choices(cfg: ExperimentConfig) -> None:
    """Refuse an unknown task, backbone, loss, optimiser or patch planner before any work, each
    with the registered choices named (they live in registries later than ``config/``)."""
    get_task(cfg.task)
    get_spec(cfg.model.backbone)
    LOSSES.get(cfg.loss.name)
    OPTIMIZERS.get(cfg.optim.optimizer)
    if cfg.data.sampler != "auto":
        PLANNERS.get(cfg.data.sampler)


def _discard_unstarted_run_on_os_error(train: Any) -> Any:
    """A new run that fails with an ``OSError`` (disk full, read-only folder) before its first
    checkpoint leaves no run folder: it would hold nothing to resume, yet block the rerun. A run
    with a checkpoint is kept (``resume=true`` continues it); a folder that existed stays, empty.
    """

    @functools.wraps(train)
    def wrapper(cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> RunResult:
        import shutil

        run_dir = resolve_run_dir(cfg)
        existed = run_dir.is_dir()
        fresh = (
            not cfg.resume and is_launching_process() and not (existed and any(run_dir.iterdir()))
        )
        try:
            return train(cfg, *args, **kwargs)
        except OSError:
            if fresh and run_dir.is_dir() and not last_checkpoint_path(run_dir).is_file():
                log.info("removing %s: the run failed before its first checkpoint", run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                if existed:
                    run_dir.mkdir(exist_ok=True)
            raise

    return wrapper


def _write_run_folder(
    cfg: ExperimentConfig,
    run_dir: Path,
    launch: Launch,
    decision: dict[str, Any],
    logger: Logger | None,
    report: dict[str, Any] | None,
) -> Path | None:
    """Rank 0's writes, once every process is ready; the transfer report's path if written."""
    if decision.get("start_over"):
        clear_run_dir(run_dir)
    if cfg.resume:
        remove_partial_checkpoints(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)
    write_launch_record(run_dir, launch, cfg.data.batch_size)
    if isinstance(logger, WandbLogger) and not (run_dir / WANDB_ID_FILE).is_file():
        write_text(run_dir / WANDB_ID_FILE, str(logger.version) + "\n")
    return None if report is None else write_json(run_dir / TRANSFER_REPORT, report)


@_discard_unstarted_run_on_os_error
def run_training(cfg: ExperimentConfig, extra_callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train ``cfg`` in its run folder; export (pretraining) or record the transfer (fine-tuning).

    ``extra_callbacks`` are added to the Trainer (used by tests and custom drivers). Every
    process of a distributed run calls this; they start together (``pipeline/launch.py``).
    """
    from sap_lightning.batches.shared_memory import check_shared_memory
    from sap_lightning.cache import CACHE_JSON

    _check_strategy(cfg)
    check_registered_choices(cfg)
    launch = detect_launch(cfg.trainer)
    share_node_cpus(launch)
    run_dir = resolve_run_dir(cfg)
    cfg = dataclasses.replace(
        cfg,
        run_dir=str(run_dir),
        trainer=dataclasses.replace(
            cfg.trainer,
            precision=training_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        ),
    )
    cfg = per_process_batch(cfg, launch.world_size)
    start = Start(launch)
    decision = start.decision(functools.partial(decide_start, cfg, run_dir, launch))
    resume_from = Path(decision["resume_from"]) if decision.get("resume_from") else None
    if resume_from is not None:
        cfg = dataclasses.replace(cfg, resume=True)

    L.seed_everything(cfg.seed, workers=True)
    prepared: list[Any] = []
    start.prepare_node(lambda: prepared.append(_build_datamodule(cfg, primary=True)))
    with start.step():
        datamodule = prepared[0] if prepared else _build_datamodule(cfg, primary=False)
        check_shared_memory(datamodule.shared_memory_need(), launch.local_world_size)
        module = build_module(cfg, data_info_from(datamodule))
        report = None
        if isinstance(module, LesionSegmentation):
            module.validation_writer = functools.partial(
                write_validation_evaluation, out_dir=run_dir / EVALUATION_DIR
            )
            module.case_drawer = functools.partial(
                draw_validation_case,
                threshold=cfg.validation.threshold,
                b1000_channel=b1000_channel_of(module.data_info["channel_names"]),
                connectivity=cfg.validation.connectivity,
            )
            if resume_from is None:
                report = module.initialise_from_pretrained()
        logger = build_logger(cfg, run_dir, launch.primary)
        last_validation = LastValidation()
        callbacks = [
            *build_callbacks(module, run_dir, datamodule, logger),
            last_validation,
            *([StepBudget(cfg.trainer.max_steps)] if cfg.trainer.max_steps > 0 else []),
            *extra_callbacks,
        ]
        trainer = build_trainer(cfg, run_dir, logger, callbacks)
        check_world_size(trainer, launch)
    start.ready(data_digest(datamodule.cache_root / CACHE_JSON, datamodule.splits_path))

    # The folder is written only once every process is ready.
    report_path = None
    with start.step():
        if launch.primary:
            report_path = _write_run_folder(cfg, run_dir, launch, decision, logger, report)
    start.started()
    # Processes Lightning's launcher creates during fit read the decision (not the folder).
    children = contextlib.nullcontext() if launch.external else decision_for_children(decision)
    try:
        with children, warnings.catch_warnings():
            # Keeping whole-case batches on the CPU is deliberate (SapModule docstring).
            warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`")
            # Only a resumed run finds checkpoints in its folder (a new one refuses a used one).
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            if isinstance(logger, WandbLogger) and report is not None and launch.primary:
                wandb_log.log_transfer_report(logger, report)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            if _final_model_unvalidated(cfg, trainer, last_validation):
                # The last epoch's model is the one used (docs/method.md): always score it.
                trainer.validate(module, datamodule=datamodule, verbose=False)
        backbone = None
        if get_task(cfg.task).exports_backbone and trainer.is_global_zero:
            if trainer.interrupted:
                log.warning("training was interrupted: %s not exported", BACKBONE_FILE)
            else:
                backbone = module.export_backbone(run_dir / BACKBONE_FILE)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            if backbone is not None:
                wandb_log.log_backbone_artifact(logger, cfg.name, backbone, module.backbone_meta())
            wandb_log.log_evaluation(logger, run_dir)
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()  # no-op without an active run (other ranks, early failures)

    result = RunResult(
        run_dir=run_dir,
        last_checkpoint=_existing(last_checkpoint_path(run_dir)),
        best_checkpoint=_existing(run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT),
        transfer_report=_existing(run_dir / TRANSFER_REPORT)
        if report_path is None
        else report_path,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        interrupted=trainer.interrupted,
        is_global_zero=trainer.is_global_zero,
    )
    result.backbone = backbone
    return result


def write_validation_evaluation(module: LesionSegmentation, out_dir: Path) -> None:
    """Write a lesion module's latest validation as an evaluation folder (``sap evaluate``'s
    layout), so ``sap compare`` reads fine-tuning runs directly; the last epoch's overwrites
    earlier ones, matching the paper's use of the last epoch's model. Every rank calls it (the
    per-case tables are gathered from all ranks); rank 0 writes."""
    val = module.cfg.validation
    settings = EvaluationSettings(
        threshold=val.threshold, connectivity=val.connectivity, tolerance_mm=val.tolerance_mm
    )
    sources = {"run": str(module.cfg.run_dir), "cases": "validation (threshold-tuning fold)"}
    evaluation = summarize_metrics(
        module.val_metrics,
        settings,
        val.threshold,
        sources,
        ignore_label=module.ignore_value is not None,
    )
    if module.trainer.is_global_zero:
        write_evaluation(evaluation, out_dir)
        wandb_log.keep_validation_pictures(module)


class StepBudget(Callback):
    """Stop training after ``max_steps`` optimiser steps (``trainer.max_steps``), inside an epoch
    if need be; the epoch-end hooks still run, so ``last.ckpt`` holds the final model."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = int(max_steps)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.max_steps:
            trainer.should_stop = True


class LastValidation(Callback):
    """Remembers the optimiser step of the last (non sanity-check) validation."""

    def __init__(self) -> None:
        self.step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _final_model_unvalidated(
    cfg: ExperimentConfig, trainer: L.Trainer, last: LastValidation
) -> bool:
    """True when fit ended normally after steps no validation has seen (``every_n_epochs``
    skipped the last epoch, or a step budget ended training inside an epoch)."""
    if trainer.interrupted or cfg.trainer.fast_dev_run or cfg.task == "ssl":
        return False
    return last.step != trainer.global_step


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None
