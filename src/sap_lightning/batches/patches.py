"""From the preprocessing cache to training patches (``tio.Subject``) and whole-case samples.

Training never loads a volume: :class:`PatchDataset` opens cached arrays memory-mapped and
copies out only the patch a task needs (:func:`read_window`). Validation and test read whole
cases (:class:`WholeCaseDataset`), one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset

from sap_lightning.batches.planners import EpochPlan, PatchTask, choose_patch_origin
from sap_lightning.batches.store import CaseStore
from sap_lightning.cache.reader import IGNORE_VALUE, CachedCase
from sap_lightning.core.errors import DatasetError

IMAGE = "image"
LABEL = "label"
CASE_ID = "case_id"
TASK_INDEX = "task_index"
LOCATION = tio.LOCATION
"""Patch bounds in the case, ``(x0, y0, z0, x1, y1, z1)`` (TorchIO's key for patch locations)."""


def read_window(array: np.ndarray, lo: Sequence[int], size: Sequence[int], fill: float = 0):
    """Copy the window ``[lo, lo + size)`` of the last three axes of ``array`` (a memory map:
    only that window is read); parts outside the volume are filled with ``fill``."""
    lo = np.asarray(lo, dtype=int)
    size = np.asarray(size, dtype=int)
    shape = np.asarray(array.shape[-3:])
    src_lo = np.clip(lo, 0, shape)
    src_hi = np.clip(lo + size, 0, shape)
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    if np.array_equal(src_lo, lo) and np.array_equal(src_hi, lo + size):
        return np.array(array[(..., *src)])
    out = np.full((*array.shape[:-3], *size), fill, dtype=array.dtype)
    dst = tuple(slice(a - b, a - b + (c - a)) for a, b, c in zip(src_lo, lo, src_hi))
    out[(..., *dst)] = array[(..., *src)]
    return out


def task_seed(seed: int, epoch: int, rank: int, index: int) -> np.random.SeedSequence:
    """The random stream of one patch: its position inside the patch and its augmentation.

    A function of the run seed, epoch, rank and the task's plan index, so patch positions and
    augmentations differ between ranks and epochs, and a run is reproducible for a seed and a
    world size whatever the number of loader workers or their scheduling.
    """
    return np.random.SeedSequence([int(seed), int(epoch), int(rank), int(index)])


class PatchDataset(Dataset):
    """The training patches of the current epoch plan, as ``tio.Subject`` (used by the Queue).

    Item ``i`` carries out plan task ``i``: it draws the patch origin inside the task's bounds,
    reads that patch (image, and label when ``with_label``) from the memory-mapped cache, then
    applies ``transform`` (augmentations) under a generator seeded for this task only.
    """

    def __init__(
        self,
        store: CaseStore,
        plan: EpochPlan,
        patch_size: Sequence[int],
        transform: tio.Transform | None,
        with_label: bool,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.store = store
        self.plan = plan
        self.patch = np.asarray(patch_size, dtype=int)
        if isinstance(transform, tio.Compose) and len(transform) == 0:
            transform = None  # nothing to draw: skip seeding the generator per patch
        self.transform = transform
        self.with_label = with_label
        self.seed = int(seed)
        self.rank = int(rank)

    def __len__(self) -> int:
        return len(self.plan)

    def dry_iter(self) -> list[PatchTask]:
        """The tasks without reading anything (what ``tio.Queue`` counts patches over)."""
        return list(self.plan.tasks)

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __getitem__(self, index: int | tuple[int, ...]) -> tio.Subject:
        """Task ``index`` of the current plan, or of epoch ``e`` for ``(e, index, ...)`` (what
        the queue's persistent workers receive: their copy of the plan follows the tasks)."""
        if isinstance(index, tuple):
            epoch, index = index[0], index[1]
            self.plan.set_epoch(epoch)
        task = self.plan[index]
        case = self.store.get(task.case_id)
        shape = np.asarray(case.image.shape[1:])
        sequence = task_seed(self.seed, self.plan.epoch, self.rank, task.index)
        position_seed, augment_seed = sequence.spawn(2)
        rng = np.random.default_rng(position_seed)

        def focus_voxel() -> np.ndarray | None:
            return _random_foreground_voxel(case, task, rng)

        origin = choose_patch_origin(task, self.patch, shape, rng, focus_voxel)
        image = read_window(case.image, origin, self.patch)
        entries: dict[str, Any] = {
            IMAGE: tio.ScalarImage(tensor=torch.from_numpy(image)),
            CASE_ID: task.case_id,
            TASK_INDEX: task.index,
            LOCATION: torch.as_tensor([*origin, *(origin + self.patch)], dtype=torch.int64),
        }
        if self.with_label:
            if case.label is None:
                raise DatasetError(
                    f"cache case {task.case_id}: {case.folder}: no label.npy to train on"
                )
            label = read_window(case.label, origin, self.patch)
            entries[LABEL] = tio.LabelMap(tensor=torch.from_numpy(label[None]))
        subject = tio.Subject(entries)
        if self.transform is not None:
            subject = _seeded(self.transform, subject, int(augment_seed.generate_state(1)[0]))
        return subject


def _seeded(transform: tio.Transform, subject: tio.Subject, seed: int) -> tio.Subject:
    """Apply ``transform`` with torch's CPU generator seeded for this call only.

    TorchIO draws from the global CPU generator; its state is restored afterwards, since this
    may run in the main process (``num_workers=0``). Only the CPU generator is touched (patches
    are CPU tensors): ``torch.manual_seed`` would also queue seeding of every accelerator.
    """
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(subject)
    finally:
        generator.set_state(state)


def _random_foreground_voxel(
    case: CachedCase, task: PatchTask, rng: np.random.Generator
) -> np.ndarray | None:
    """A voxel with label ``> 0`` inside the task's focus box (read from the label map), never
    one of the ``ignore`` label (:data:`IGNORE_VALUE`, above every class)."""
    if case.label is None:
        return None
    lo = np.asarray(task.focus[:3])
    window = np.asarray(case.label[tuple(slice(a, b) for a, b in zip(lo, task.focus[3:]))])
    voxels = np.argwhere((window > 0) & (window != IGNORE_VALUE))
    if len(voxels) == 0:
        return None
    return lo + voxels[rng.integers(len(voxels))]


class WholeCaseDataset(Dataset):
    """Whole cases for validation and test: ``image`` (C, X, Y, Z) float32, ``label``
    (1, X, Y, Z) as cached (uint8; when ``with_label``), ``body`` (1, X, Y, Z) bool (the cache's
    body mask, for ``validation.body_only``), ``case_id`` and ``spacing`` (3,) float64.

    The label stays uint8 here: a loader worker hands each case over in shared memory, where an
    int64 label would take 8 bytes a voxel (more than a two-channel float32 image);
    :class:`WholeCaseLoader` widens it in the main process."""

    def __init__(self, store: CaseStore, case_ids: Sequence[str], with_label: bool) -> None:
        self.store = store
        self.case_ids = list(case_ids)
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self.case_ids[index]
        case = self.store.get(case_id)
        sample: dict[str, Any] = {
            IMAGE: torch.from_numpy(np.array(case.image, dtype=np.float32)),
            CASE_ID: case_id,
            "spacing": torch.tensor(case.spacing, dtype=torch.float64),
            "body": torch.from_numpy(np.array(case.body_mask, dtype=bool))[None],
        }
        if self.with_label:
            if case.label is None:
                raise DatasetError(
                    f"cache case {case_id}: {case.folder}: no label.npy to validate against"
                )
            sample[LABEL] = torch.from_numpy(np.array(case.label))[None]
        return sample


def widen_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with an integer ``label`` as int64 (what losses and metrics index with)."""
    label = batch.get(LABEL)
    if isinstance(label, torch.Tensor) and label.dtype != torch.int64:
        batch[LABEL] = label.long()
    return batch


class WholeCaseLoader(DataLoader):
    """The whole-case loader: cases cross from the worker in their cached dtypes (uint8 label)
    and reach the caller with an int64 ``label``."""

    def __iter__(self) -> Iterator[Any]:
        return map(widen_labels, super().__iter__())


class HostBatch(Mapping[str, Any]):
    """A whole-case batch that stays on the CPU: a read-only mapping that is not a ``dict``.

    DDP's forward on CUDA (``device_ids`` set) moves every tensor it finds in the dicts, lists
    and tuples of its inputs to the GPU (``torch.distributed.utils._recursive_to``), so a whole
    case handed to ``validation_step`` would be copied to the GPU although sliding-window
    inference moves one window batch at a time and stitches on the CPU. Any other type is passed
    through untouched.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"HostBatch({self._items!r})"
