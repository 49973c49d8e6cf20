"""Lightning DataModules of the three tasks (skeleton, lesion, SSL), built from the preprocessing
cache and ``splits.json`` by :func:`build_datamodule`.

Batches:

- training: ``{"image": float32 (B, C, *patch), "label": int64 (B, 1, *patch) (not for SSL),
  "case_id": list[str], "task_index": int64 (B,), "location": int64 (B, 6)}``, streamed
  through ``queue.py``;
- validation / test: whole cases, batch size 1, ``{"image": (1, C, X, Y, Z), "label":
  (1, 1, X, Y, Z) int64 (uint8 in shared memory, widened by the loader), "body": bool (1, 1, X, Y, Z), "case_id": [str], "spacing": float64
  (1, 3)}``, split over ranks by a
  ``DistributedSampler`` without shuffling (its padding repeats a case: metrics drop duplicate
  case ids). SSL validates on a fixed set of un-augmented patches of its validation cases
  (``samples_per_volume`` per case, batches as in training, without labels) so its loss curve
  is comparable between epochs.

Under DDP, build the Trainer with ``use_distributed_sampler=False`` (``setup`` refuses to run
otherwise) and pass ``datamodule.callbacks()`` to it: the callback moves the epoch plan forward at
every train epoch start and checks at the start of training that every rank runs the same
number of steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from sap_lightning.batches.augment import build_augmentation, check_augment_config
from sap_lightning.batches.patches import PatchDataset, WholeCaseDataset, WholeCaseLoader
from sap_lightning.batches.planners import (
    PLANNERS,
    BodyUniformPlanner,
    EpochPlan,
    PatchPlanner,
)
from sap_lightning.batches.queue import (
    EpochQueue,
    QueueMemory,
    build_patch_loader,
    build_patch_queue,
    collate_patches,
    patch_nbytes,
)
from sap_lightning.batches.shared_memory import SharedMemoryNeed, training_need, whole_case_bytes
from sap_lightning.batches.store import CaseStore
from sap_lightning.cache import (
    CACHE_JSON,
    PreprocessedCache,
    PreprocessParams,
    open_cache,
    preprocess_dataset,
)
from sap_lightning.cache.splits import Splits, cache_lesion_counts, load_splits, split_dataset
from sap_lightning.config.schema import ExperimentConfig
from sap_lightning.core.errors import ConfigError, DatasetError
from sap_lightning.core.tasks import get_task
from sap_lightning.dataset import layout
from sap_lightning.dataset.info import DatasetInfo

log = logging.getLogger(__name__)

SSL_VALIDATION_SEED = 1_000_003
"""Seed offset of the fixed SSL validation patches (kept apart from the training plans)."""


class SapDataModule(L.LightningDataModule):
    """Training patches, whole-case validation and test for one task, from the cache.

    Properties the LightningModules need (``task``, ``in_channels``, ``num_classes``,
    ``channel_names``, ``label_names``, ``spacing``) are read from the cache and the splits,
    never from the configuration, so they cannot disagree with the data. They are available
    as soon as the cache exists (``prepare_data`` builds it when missing).

    The Trainer must be built with ``use_distributed_sampler=False`` and
    ``callbacks=[*datamodule.callbacks(), ...]``.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Training runs prepare on every node themselves (pipeline/launch.py); Lightning's own
        # call then finds the files in place.
        self.prepare_data_per_node = False
        data = cfg.data
        self.dataset_root = Path(data.dataset)
        self.cache_root = (
            Path(data.cache) if data.cache else layout.default_cache_path(data.dataset)
        )
        self.splits_path = (
            Path(data.splits) if data.splits else layout.default_splits_path(data.dataset)
        )
        self.patch_size = tuple(int(n) for n in data.patch_size)
        self.sampler_name = (
            get_task(cfg.task).default_planner if data.sampler == "auto" else data.sampler
        )
        self.dataset_info: DatasetInfo | None = None
        """The dataset as validated by the caller, so building the cache and splits does not
        validate it again (None: they validate it themselves)."""
        self._cache: PreprocessedCache | None = None
        self._splits: Splits | None = None
        self._store: CaseStore | None = None
        self.world_size = 1
        self.rank = 0
        self.plan: EpochPlan | None = None
        self.queue: EpochQueue | None = None
        self.queue_memory: QueueMemory | None = None
        self._train_loader: DataLoader | None = None

    # ------------------------------------------------------------------ data-derived properties

    @property
    def cache(self) -> PreprocessedCache:
        if self._cache is None:
            if not (self.cache_root / CACHE_JSON).is_file():
                raise DatasetError(
                    f"cache {self.cache_root}: not built yet; call datamodule.prepare_data() or "
                    f"run sap preprocess {self.dataset_root} --out {self.cache_root}"
                )
            cache = open_cache(self.cache_root)
            self._check_cache(cache)
            self._cache = cache
        return self._cache

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            splits = load_splits(self.splits_path, dataset=self.cache.case_ids)
            if splits.task != self.cache.task:
                raise DatasetError(
                    f"{self.splits_path}: a {splits.task} split, but cache "
                    f"{self.cache_root} holds a {self.cache.task} dataset"
                )
            data = self.cfg.data
            if splits.task == "lesion" and (splits.n_folds, splits.tuning_fold) != (
                data.n_folds,
                data.tuning_fold,
            ):
                raise ConfigError(
                    f"{self.splits_path}: {splits.n_folds} folds with tuning fold "
                    f"{splits.tuning_fold}, but data.n_folds={data.n_folds} and "
                    f"data.tuning_fold={data.tuning_fold}; make them agree"
                )
            self._splits = splits
        return self._splits

    @property
    def store(self) -> CaseStore:
        if self._store is None:
            self._store = CaseStore(self.cache)
        return self._store

    @property
    def task(self) -> str:
        return self.cfg.task

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self.cache.channel_names

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class names in label-value order (background first); empty for SSL."""
        if self.task == "ssl":
            return ()
        labels = self.cache.labels
        return tuple(sorted(labels, key=labels.__getitem__))

    @property
    def ignore_value(self) -> int | None:
        """The label value the loss and the validation metrics leave out (the cache's
        ``IGNORE_VALUE``), ``None`` when the dataset declares no ``ignore`` label or for SSL."""
        return None if self.task == "ssl" else self.cache.ignore_value

    @property
    def num_classes(self) -> int | None:
        """Network outputs for segmentation (10 skeleton, 2 lesion); ``None`` for SSL."""
        return None if self.task == "ssl" else len(self.label_names)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Median voxel spacing (mm, array axis order) of the training cases."""
        spacings = np.array([self.cache.meta(c)["spacing"] for c in self.train_case_ids])
        return tuple(float(s) for s in np.median(spacings, axis=0))  # type: ignore[return-value]

    @property
    def train_case_ids(self) -> list[str]:
        splits = self.splits
        if splits.task == "lesion":
            return splits.train_cases(self.cfg.data.fold)
        return list(splits.train)

    @property
    def val_case_ids(self) -> list[str]:
        splits = self.splits
        return splits.tuning_cases() if splits.task == "lesion" else list(splits.val)

    @property
    def test_case_ids(self) -> list[str]:
        """Lesion: the test fold ``data.fold``. Skeleton and SSL have no test set (docs/method.md
        reports stage-1 validation Dice): their test cases are the validation cases."""
        splits = self.splits
        if splits.task == "lesion":
            return splits.test_cases(self.cfg.data.fold)
        return list(splits.val)

    def _check_cache(self, cache: PreprocessedCache) -> None:
        """The cache must hold the data this task trains on, on the configured grid."""
        where = f"cache {self.cache_root} (dataset {cache.dataset})"
        if self.dataset_root.exists() and cache.dataset != self.dataset_root.resolve():
            rank_zero_warn(
                f"{where} was not built from data.dataset {self.dataset_root}; its cases are "
                f"checked against {self.splits_path}"
            )
        if self.task in ("lesion", "skeleton") and cache.task != self.task:
            raise ConfigError(
                f"task '{self.task}' needs a {self.task} dataset, but {where} holds "
                f"{cache.task} labels {sorted(cache.labels)}"
            )
        if self.task != "ssl" and not cache.labelled:
            raise DatasetError(f"{where}: cached without labels; task '{self.task}' needs them")
        wanted = self.cfg.data.target_spacing
        have = cache.target_spacing
        if (wanted is None) != (have is None) or (
            wanted is not None and not np.allclose(wanted, have)  # type: ignore[arg-type]
        ):
            raise ConfigError(
                f"{where} was built with target spacing {have}, data.target_spacing is "
                f"{wanted}; point data.cache at another folder or rebuild it"
            )
        requires = PLANNERS.get(self.sampler_name).requires
        if requires == "lesion" and cache.task != "lesion":
            raise ConfigError(f"data.sampler={self.sampler_name} needs lesion labels; {where}")
        if requires == "labels" and (self.task == "ssl" or not cache.labelled):
            raise ConfigError(
                f"data.sampler={self.sampler_name} needs labelled segmentation data (task "
                f"'{self.task}', {where})"
            )

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Build the cache and ``splits.json`` when missing (global rank 0 only; a training run
        has its first process of every node call :meth:`prepare_cache_and_splits` itself)."""
        if rank_zero_only.rank != 0:
            return
        self.prepare_cache_and_splits()

    def prepare_cache_and_splits(self) -> None:
        """Build the cache and ``splits.json`` when missing, in this process. Safe beside other
        processes doing the same on one shared folder: both writers take the file's lock."""
        if not (self.cache_root / CACHE_JSON).is_file():
            rank_zero_info(f"building preprocessing cache {self.cache_root}")
            spacing = self.cfg.data.target_spacing
            params = PreprocessParams(target_spacing=None if spacing is None else tuple(spacing))
            preprocess_dataset(
                self.dataset_root, self.cache_root, params, info=self.dataset_info,
                task=self.dataset_task,
            )  # fmt: skip
        if not self.splits_path.is_file():
            rank_zero_info(f"writing splits {self.splits_path}")
            data = self.cfg.data
            split_dataset(
                self.dataset_root,
                n_folds=data.n_folds,
                tuning_fold=data.tuning_fold,
                seed=data.split_seed,
                val_fraction=data.val_fraction,
                out=self.splits_path,
                info=self.dataset_info,
                task=self.dataset_task,
                lesion_counts=cache_lesion_counts(open_cache(self.cache_root))
                if self.task == "lesion"
                else None,
            )

    @property
    def dataset_task(self) -> str | None:
        """The task the dataset is read for (labels merged into one lesion class for
        ``lesion``); ``None`` for SSL, which reads no labels, so the label set decides."""
        return self.task if self.task in ("lesion", "skeleton") else None

    def setup(self, stage: str | None = None) -> None:
        self._read_trainer()
        _ = self.splits  # open and check cache and splits before any work starts
        if stage in (None, "fit") and self.queue is None:
            self._setup_training()

    def _read_trainer(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        self.world_size = int(trainer.world_size)
        self.rank = int(trainer.global_rank)
        connector = getattr(trainer, "_accelerator_connector", None)
        if self.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ConfigError(
                f"the Trainer runs on {self.world_size} processes with "
                "use_distributed_sampler=True: Lightning would re-split each rank's patch "
                "queue and drop half of its patches; build it with "
                "lightning.Trainer(..., use_distributed_sampler=False)"
            )

    def _planner(
        self, case_ids: Sequence[str], seed: int, count: int, multiple: int
    ) -> PatchPlanner:
        return PLANNERS.get(self.sampler_name).from_config(
            self.store,
            case_ids,
            self.patch_size,
            seed,
            count=count,
            multiple=multiple,
            data=self.cfg.data,
        )

    def _setup_training(self) -> None:
        data = self.cfg.data
        check_augment_config(data.augment)
        if data.num_workers < 0:
            raise ConfigError(f"'data.num_workers' must be >= 0; got {data.num_workers}")
        cases = self.train_case_ids
        count = data.patches_per_epoch or data.samples_per_volume * len(cases)
        multiple = self.world_size * data.batch_size
        planner = self._planner(cases, self.cfg.seed, count, multiple)
        self.plan = EpochPlan(planner, epoch=0)
        augment = data.augment
        if self.task == "ssl":
            # The pretext's own rotations and cut-outs are the only geometric transforms of SSL
            # views: a flip or quarter turn before them would make the rotation label
            # unidentifiable. Intensity augmentation stays.
            augment = dataclasses.replace(augment, flip_p=0.0, rot90_p=0.0)
        dataset = PatchDataset(
            self.store,
            self.plan,
            self.patch_size,
            build_augmentation(augment),
            with_label=self.task != "ssl",
            seed=self.cfg.seed,
            rank=self.rank,
        )
        self.queue = build_patch_queue(
            dataset, data.queue_length, data.num_workers, self.world_size, self.rank
        )
        self.queue_memory = QueueMemory(
            patch_nbytes(self.in_channels, self.patch_size, self.task != "ssl"),
            self.queue.max_length,
            data.num_workers,
        )
        self._warn_if_epochs_are_cut()
        rank_zero_info(
            f"{self.task} training: {len(self.plan)} patches of {self.patch_size} per epoch "
            f"({self.sampler_name} over {len(cases)} cases), {self.steps_per_epoch} steps per "
            f"rank on {self.world_size} rank(s); {self.queue_memory}"
        )

    def _warn_if_epochs_are_cut(self) -> None:
        """Instance-balanced epochs show every lesion once only if they run to the end."""
        trainer = getattr(self, "trainer", None)
        limit = getattr(trainer, "limit_train_batches", None)
        if self.sampler_name != "instance_balanced" or limit is None:
            return
        steps = self.steps_per_epoch
        allowed = limit if isinstance(limit, int) else int(limit * steps)
        if allowed < steps:
            rank_zero_warn(
                f"trainer.limit_train_batches={limit} runs {allowed} of the {steps} steps of an "
                "instance-balanced epoch: each epoch then sees a random subset of the lesions, "
                "not every lesion once"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Training steps each rank runs per epoch (the same on every rank by construction)."""
        if self.queue is None:
            raise RuntimeError("call setup('fit') first")
        return len(self.queue) // self.cfg.data.batch_size

    def set_train_epoch(self, epoch: int) -> None:
        """Draw the plan of ``epoch`` and restart the queue on it (called by the callback)."""
        if self.queue is not None:
            self.queue.start_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        if self.queue is None:
            self.setup("fit")
        assert self.queue is not None
        if self._train_loader is None:
            self._train_loader = build_patch_loader(self.queue, self.cfg.data.batch_size)
        return self._train_loader

    def _distributed(self, dataset: Any) -> DistributedSampler:
        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=False
        )

    def shared_memory_need(self) -> SharedMemoryNeed:
        """The shared memory this process's training and validation loaders hold at most."""
        data = self.cfg.data
        channels = self.in_channels
        with_label = self.task != "ssl"
        label_itemsize = None
        if with_label:
            label = self.store.get(self.train_case_ids[0]).label
            label_itemsize = 1 if label is None else int(label.dtype.itemsize)
        if self.task == "ssl":
            item = data.batch_size * int(np.prod(self.patch_size)) * 4 * channels
        else:
            shapes = [self.cache.meta(c)["shape"] for c in self.val_case_ids] or [[0, 0, 0]]
            item = max(whole_case_bytes(shape, channels, with_label) for shape in shapes)
        return training_need(
            channels, self.patch_size, label_itemsize, data.batch_size, data.queue_length,
            data.num_workers, item,
        )  # fmt: skip

    def _whole_case_loader(self, case_ids: Sequence[str]) -> DataLoader:
        dataset = WholeCaseDataset(self.store, case_ids, with_label=True)
        # One background worker loads the next case during inference on the current one; more
        # would hold more whole-body volumes in memory for no gain.
        workers = min(1, self.cfg.data.num_workers)
        return WholeCaseLoader(
            dataset,
            batch_size=1,
            sampler=self._distributed(dataset),
            num_workers=workers,
        )

    def _ssl_patch_loader(self, case_ids: Sequence[str]) -> DataLoader:
        data = self.cfg.data
        count = data.samples_per_volume * len(case_ids)
        planner = BodyUniformPlanner(
            self.store, case_ids, self.patch_size, self.cfg.seed + SSL_VALIDATION_SEED, count
        )
        dataset = PatchDataset(
            self.store, EpochPlan(planner), self.patch_size, None, False, self.cfg.seed
        )
        return DataLoader(
            dataset,
            batch_size=data.batch_size,
            sampler=self._distributed(dataset),
            num_workers=min(1, data.num_workers),
            collate_fn=collate_patches,
        )

    def val_dataloader(self) -> DataLoader:
        if self.task == "ssl":
            return self._ssl_patch_loader(self.val_case_ids)
        return self._whole_case_loader(self.val_case_ids)

    def test_dataloader(self) -> DataLoader:
        if self.task == "ssl":
            return self._ssl_patch_loader(self.test_case_ids)
        return self._whole_case_loader(self.test_case_ids)

    def callbacks(self) -> list[L.Callback]:
        """Callbacks the Trainer needs for this datamodule's training loader."""
        return [PatchPlanCallback(self)]


class PatchPlanCallback(L.Callback):
    """Keeps the patch plan in step with the Trainer's epoch and checks equal step counts.

    Lightning calls ``set_epoch`` only on the samplers of the loaders it sees, never on the
    queue's subject sampler nor on the plan inside its dataset: without this callback every
    epoch would replay the first epoch's plan.
    """

    def __init__(self, datamodule: SapDataModule) -> None:
        self.datamodule = datamodule

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Also covers a run resumed in the middle of an epoch (no on_train_epoch_start then).
        self.datamodule.set_train_epoch(trainer.current_epoch)
        self._check_equal_steps(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.datamodule.set_train_epoch(trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_feed()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop_feed()

    def _stop_feed(self) -> None:
        if self.datamodule.queue is not None:
            self.datamodule.queue.close()

    def _check_equal_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Ranks with different step counts would hang DDP at the first missing all-reduce."""
        steps = torch.tensor([self.datamodule.steps_per_epoch], device=pl_module.device)
        gathered = trainer.strategy.all_gather(steps).reshape(-1).tolist()
        if min(gathered) != max(gathered):
            raise RuntimeError(
                f"training steps per epoch differ between ranks: {gathered} (rank order); "
                "every rank must run the same number of steps or DDP hangs"
            )
        if min(gathered) == 0:
            raise DatasetError(
                f"no full training batch per epoch: {len(self.datamodule.queue or ())} patches "
                f"per rank, batch size {self.datamodule.cfg.data.batch_size}"
            )


def build_datamodule(cfg: ExperimentConfig) -> SapDataModule:
    """The DataModule of ``cfg.task`` (``skeleton``, ``lesion`` or ``ssl``)."""
    get_task(cfg.task)  # an unknown task raises naming the valid ones
    check_augment_config(cfg.data.augment)
    return SapDataModule(cfg)
