"""The training patch queue: the only place in the library that builds a ``tio.Queue``.

The queue's *subjects* are the patch tasks of the current epoch plan (``PatchDataset``): its
loader workers cut and augment one patch per task, and the queue buffers ``max_length`` of them
for the training loader. Under DDP (docs/data_flow.md, "TorchIO Queue under DDP"):

- each rank takes a disjoint share of the plan through ``subject_sampler=DistributedSampler(
  shuffle=False)`` and ``shuffle_subjects=False``; the plan itself is reshuffled every epoch from
  a seed shared by all ranks, so shares change between epochs and together cover the plan;
- the Trainer must be built with ``use_distributed_sampler=False``, or Lightning would wrap the
  outer loader again and each rank would use only part of its own share;
- :meth:`EpochQueue.start_epoch` must run at every train epoch start (``datamodule.callbacks()``
  does it): Lightning never reaches a sampler hidden inside a dataset;
- the plan length is a multiple of ``world size x batch size`` and the outer loader drops
  incomplete batches, so every rank runs the same number of steps.

With loader workers, a background thread keeps the queue topped up (:class:`PatchFeed`): the
stock queue refills only when it is empty, cutting ``max_length`` patches while the training
step waits, and its workers sit idle while it is consumed (they hold two tasks each).

Loader workers are started once and kept (``persistent_workers``): each epoch restart of the
stock queue forked them again, which cost more than loading the patches. A worker's copy of the
plan is brought to the right epoch by the task itself: the sampler yields ``(epoch, index,
slot)`` (:class:`EpochTaggedSampler`) and ``PatchDataset`` draws that epoch's plan (a function
of the seed and epoch only) before cutting the patch. Workers write each patch into ``slot`` of
a shared-memory ring allocated once (:class:`PatchRing`) and send back only its small entries:
pickling a patch instead made a new shared-memory segment per tensor and passed its file
descriptor over a socket, which cost more than cutting the patch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from sap_lightning.batches.patches import CASE_ID, IMAGE, LABEL, LOCATION, TASK_INDEX, PatchDataset

log = logging.getLogger(__name__)

LOADER_PREFETCH = 2
"""Tasks each loader worker holds in flight (PyTorch's default ``prefetch_factor``)."""


class PrecutPatchSampler(tio.data.PatchSampler):
    """Yields each subject once, as is: ``PatchDataset`` already cut it to the patch size in a
    loader worker (so that only the patch is read from the memory map and augmented), leaving
    nothing for the queue's sampler to crop."""

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Generator[tio.Subject]:
        shape = tuple(int(n) for n in subject.spatial_shape)
        if shape != tuple(int(n) for n in self.patch_size):
            raise RuntimeError(f"patch of shape {shape}, expected {tuple(self.patch_size)}")
        yield subject


class EpochTaggedSampler(Sampler):
    """This rank's share of the plan as ``(epoch, index, slot)``, the epoch read when the
    iteration starts: persistent loader workers hold their own copy of the plan, and each task
    tells them which epoch's plan it belongs to. ``slot`` counts on across iterations, modulo
    the ring size, so a slot is reused only after ``slots`` later tasks. An iteration starts
    ``skip`` tasks into the share (a run resumed inside an epoch: :meth:`EpochQueue.resume`)."""

    def __init__(self, inner: DistributedSampler, dataset: PatchDataset, slots: int) -> None:
        self.inner = inner
        self.dataset = dataset
        self.slots = max(1, int(slots))
        self.skip = 0
        self._next = 0

    def __iter__(self):
        epoch = int(self.dataset.plan.epoch)
        for index in itertools.islice(self.inner, self.skip, None):
            slot, self._next = self._next, (self._next + 1) % self.slots
            yield epoch, int(index), slot

    def __len__(self) -> int:
        return len(self.inner)


class PatchRing:
    """Shared-memory slots that loader workers write patches into (image, and label when the
    patches carry one); allocated in the main process before the workers start.

    A patch in the queue is a view of its slot until its batch is collated (a copy), so the ring
    holds every patch that can be alive at once: the queue, a batch being popped and the tasks
    in flight in the workers (:meth:`EpochQueue._ring_size`).
    """

    def __init__(
        self, slots: int, image: np.ndarray, label: np.ndarray | None, patch: Sequence[int]
    ) -> None:
        size = tuple(int(n) for n in patch)
        # float32 as the batches are (augmentations may turn another cache dtype into it).
        self.image = torch.empty((slots, image.shape[0], *size), dtype=torch.float32)
        self.image.share_memory_()
        self.label: torch.Tensor | None = None
        if label is not None:
            label_dtype = torch.from_numpy(np.empty(0, dtype=label.dtype)).dtype
            self.label = torch.empty((slots, 1, *size), dtype=label_dtype).share_memory_()

    def put(self, slot: int, subject: tio.Subject) -> dict[str, Any]:
        """Copy a worker's patch into ``slot``; returns what is left to send: small entries
        (tensors as numpy arrays, which pickle as bytes rather than as shared memory)."""
        self.image[slot].copy_(subject[IMAGE].data)
        has_label = LABEL in subject
        if has_label:
            assert self.label is not None
            self.label[slot].copy_(subject[LABEL].data)
        rest = {
            key: value.numpy() if isinstance(value, torch.Tensor) else value
            for key, value in subject.items()
            if key not in (IMAGE, LABEL)
        }
        return {"slot": slot, "has_label": has_label, "rest": rest}

    def take(self, sent: dict[str, Any]) -> tio.Subject:
        """The patch of a slot as a ``tio.Subject`` whose images are views of the slot."""
        slot = sent["slot"]
        rest = {
            key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            for key, value in sent["rest"].items()
        }
        entries = {IMAGE: tio.ScalarImage(tensor=self.image[slot]), **rest}
        if sent["has_label"]:
            assert self.label is not None
            entries[LABEL] = tio.LabelMap(tensor=self.label[slot])
        return tio.Subject(entries)


class _RingDataset(Dataset):
    """The worker side: cut task ``(epoch, index)``'s patch and put it into ``slot``."""

    def __init__(self, dataset: PatchDataset, ring: PatchRing) -> None:
        self.dataset = dataset
        self.ring = ring

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        epoch, index, slot = item
        return self.ring.put(slot, self.dataset[(epoch, index)])


def ring_slots(queue_length: int, batch_size: int, num_workers: int) -> int:
    """Patches alive at once with loader workers: the queue, a batch being popped, the feed's
    patch waiting for room and the tasks in flight in the workers."""
    return int(queue_length + batch_size + num_workers * LOADER_PREFETCH + 1)


class PatchFeed:
    """A thread that moves one pass of patches from the loader workers into a bounded FIFO of
    ``max_length`` as soon as there is room, so the queue refills ahead of need.

    Patches come out in the order the workers' loader yields them, as the stock queue's would
    (``shuffle_patches=False``): the batches do not change, only when they are cut. The thread
    holds at most one patch beyond the FIFO (the ring counts it) and ends with the pass (this
    rank's share of the plan), so nothing is cut for an epoch that has ended. Only used with
    workers: without them patches are cut in the training process itself, where the
    augmentations reseed torch's global generator, which a thread must not do beside the step.
    """

    def __init__(self, patches: Iterator[tio.Subject], max_length: int) -> None:
        self._fifo: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(max_length)))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(patches,), name="sap-patch-feed", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Wait for room (False: the feed was closed meanwhile)."""
        while not self._stop.is_set():
            try:
                self._fifo.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, patches: Iterator[tio.Subject]) -> None:
        try:
            for patch in patches:
                if not self._put(patch):
                    return
            self._put(_FeedEnd(None))
        except BaseException as error:  # raised in the training process by get()
            self._put(_FeedEnd(error))

    def get(self) -> tio.Subject | None:
        """The next patch (waiting only when the workers fell behind); None once the pass is
        over."""
        item = self._fifo.get()
        if isinstance(item, _FeedEnd):
            if item.error is not None:
                raise item.error
            return None
        return item

    def __len__(self) -> int:
        return self._fifo.qsize()

    def close(self) -> None:
        """Stop the thread and drop what it holds (an epoch ended, or was cut short)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    self._fifo.get_nowait()
            self._thread.join(timeout=0.05)


@dataclass(frozen=True)
class _FeedEnd:
    error: BaseException | None


class EpochQueue(tio.Queue):
    """A ``tio.Queue`` that can be restarted at an epoch boundary, or where a checkpoint taken
    inside an epoch left it.

    A queue left mid-epoch (``limit_train_batches``, an interrupted epoch) still holds patches
    and a subject iterator of the old plan; :meth:`start_epoch` drops both so the new epoch
    starts from its own plan. Loader workers are started lazily, at the first patch requested
    after ``start_epoch``, so they see the new plan. :meth:`position` is how far this rank got
    into the epoch's share (saved in the checkpoint by :class:`PatchLoader`); after
    :meth:`resume`, the next ``start_epoch`` of that epoch skips the patches already trained
    on, so a resumed run sees the rest of the epoch's plan as the uninterrupted run did.
    """

    _epoch: int = 0
    _taken: int = 0
    """Patches popped in this epoch (skipped ones included): the position in the share."""
    _resume_at: tuple[int, int] | None = None
    """``(epoch, patches)`` to start from at that epoch's next start (:meth:`resume`)."""
    _tagged_sampler: EpochTaggedSampler | None = None

    def start_epoch(self, epoch: int) -> None:
        self._close_feed()
        self.subjects_dataset.set_epoch(epoch)
        if isinstance(self.subject_sampler, DistributedSampler):
            self.subject_sampler.set_epoch(epoch)
        # tio.Queue keeps this state in private attributes; resetting them is the only way to
        # restart it (tests/unit/test_datamodule.py checks it still works).
        self.patches_list = []
        self._subjects_iterable = None
        self._incomplete_subject = None
        self._num_patches_incomplete = 0
        self._num_sampled_subjects = 0
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            skip = self._resume_at[1]
        self._epoch, self._taken = int(epoch), skip
        if self._tagged_sampler is not None:
            self._tagged_sampler.skip = skip

    def position(self) -> dict[str, int]:
        """``{"epoch", "patches"}``: the epoch and the patches of this rank's share popped so
        far (every rank pops as many: the same steps of the same batch size)."""
        return {"epoch": int(self._epoch), "patches": int(self._taken)}

    def resume(self, position: dict[str, int]) -> None:
        """Start the epoch of ``position`` (at its next :meth:`start_epoch`) after the patches
        it had popped; a position at or past the share's end starts the epoch from its first
        patch (Lightning then begins the next epoch)."""
        epoch, taken = int(position["epoch"]), int(position["patches"])
        share = len(self.subject_sampler) if self.subject_sampler is not None else 0
        self._resume_at = (epoch, taken) if 0 < taken < share else None

    _subjects_loader: DataLoader | None = None
    _ring: PatchRing | None = None
    _feed: PatchFeed | None = None
    consumer_batch_size: int | None = None
    """Patches the outer loader pops per batch (``build_patch_loader`` sets it; sizes the ring)."""

    def _ring_size(self) -> int:
        """Patches alive at once: the queue, a batch being popped, the tasks in flight."""
        batch = self.consumer_batch_size or self.max_length
        return ring_slots(self.max_length, batch, int(self.num_workers))

    def __getitem__(self, index: int) -> tio.Subject:
        patch = self._next_patch(index)
        self._taken += 1
        self._resume_at = None  # the resumed epoch is under way: later starts begin at 0
        return patch

    def _next_patch(self, index: int) -> tio.Subject:
        if int(self.num_workers) == 0:
            return super().__getitem__(index)
        for _ in range(2):  # a pass that ended is followed by a new one, as tio's queue does
            if self._feed is None:
                self._feed = PatchFeed(self._patches(), self.max_length)
            patch = self._feed.get()
            if patch is not None:
                return patch
            self._feed = None
        raise RuntimeError("the patch loader yielded no patch")

    def _patches(self) -> Iterator[tio.Subject]:
        """One pass over this rank's share of the plan, a patch per task (the feed's source)."""
        for subject in self._get_subjects_iterable():
            yield from self.sampler(subject)

    def close(self) -> None:
        """Stop refilling (training ended): the feed's thread would otherwise wait for room."""
        self._close_feed()

    def _close_feed(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    @property
    def num_patches(self) -> int:
        """Patches ready in the queue (with workers: in the feed)."""
        return len(self._feed) if self._feed is not None else len(self.patches_list)

    def _get_subjects_iterable(self):
        """tio.Queue's subject loader, created once with persistent workers (each new iterator
        of it resumes the same workers, dropping what an abandoned iterator had in flight).
        Without workers the patches are cut in this process and nothing is copied."""
        workers = int(self.num_workers)
        if self._subjects_loader is None:
            patches = self.subjects_dataset
            slots = self._ring_size()
            dataset: Dataset = patches
            if workers > 0:
                case = patches.store.get(patches.plan[0].case_id)
                label = case.label if patches.with_label else None
                self._ring = PatchRing(slots, case.image, label, patches.patch)
                dataset = _RingDataset(patches, self._ring)
            self._tagged_sampler = EpochTaggedSampler(self.subject_sampler, patches, slots)
            self._tagged_sampler.skip = self._taken
            self._subjects_loader = DataLoader(
                dataset,
                num_workers=workers,
                batch_size=1,
                collate_fn=self._get_first_item,
                sampler=self._tagged_sampler,
                persistent_workers=workers > 0,
                prefetch_factor=LOADER_PREFETCH if workers > 0 else None,
            )
        self._num_sampled_subjects = 0
        if self._ring is None:
            return iter(self._subjects_loader)
        return map(self._ring.take, self._subjects_loader)


@dataclass(frozen=True)
class QueueMemory:
    """Upper bound of the RAM the training loader holds, in bytes."""

    patch_bytes: int
    queue_length: int
    num_workers: int

    @property
    def queue_bytes(self) -> int:
        return self.queue_length * self.patch_bytes

    @property
    def worker_bytes(self) -> int:
        """Patches in flight in the loader workers; each holds the read patch and its augmented
        copy."""
        return self.num_workers * LOADER_PREFETCH * 2 * self.patch_bytes

    @property
    def total_bytes(self) -> int:
        return self.queue_bytes + self.worker_bytes

    def __str__(self) -> str:
        mib = 1024**2
        return (
            f"patch queue memory <= {self.total_bytes / mib:.1f} MiB: queue "
            f"{self.queue_length} x {self.patch_bytes / mib:.2f} MiB + "
            f"{self.num_workers} workers x {LOADER_PREFETCH} in flight x 2 copies"
        )


def patch_nbytes(channels: int, patch_size: Sequence[int], with_label: bool) -> int:
    """Bytes of one training patch: float32 image channels and a uint8 label."""
    voxels = int(np.prod(patch_size))
    return voxels * (4 * channels + (1 if with_label else 0))


def build_patch_queue(
    dataset: PatchDataset,
    queue_length: int,
    num_workers: int,
    world_size: int = 1,
    rank: int = 0,
) -> EpochQueue:
    """A queue over ``dataset`` streaming this rank's share of the epoch plan (one patch per
    task, in plan order: the plan is already a random permutation)."""
    if len(dataset) % world_size:
        raise ValueError(
            f"{len(dataset)} patch tasks per epoch do not split evenly over {world_size} ranks"
        )
    subject_sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True
    )
    return EpochQueue(
        dataset,  # type: ignore[arg-type]  # duck-typed SubjectsDataset (len, [], dry_iter)
        max_length=max(1, int(queue_length)),
        samples_per_volume=1,
        sampler=PrecutPatchSampler(tuple(int(n) for n in dataset.patch)),
        subject_sampler=subject_sampler,
        num_workers=num_workers,
        shuffle_subjects=False,
        shuffle_patches=False,
        start_background=False,
    )


def collate_patches(patches: Sequence[tio.Subject]) -> dict[str, Any]:
    """Batch patches: ``image`` float32 (B, C, *patch), ``label`` int64 (B, 1, *patch) when the
    patches carry one, ``case_id`` list[str], ``task_index`` int64 (B,) (plan positions) and
    ``location`` int64 (B, 6) (patch bounds in the case, as TorchIO's patch samplers give)."""
    batch: dict[str, Any] = {
        IMAGE: torch.stack([p[IMAGE].data for p in patches]).float(),
        CASE_ID: [str(p[CASE_ID]) for p in patches],
        TASK_INDEX: torch.tensor([int(p[TASK_INDEX]) for p in patches], dtype=torch.int64),
        LOCATION: torch.stack([torch.as_tensor(p[LOCATION]) for p in patches]).long(),
    }
    if LABEL in patches[0]:
        batch[LABEL] = torch.stack([p[LABEL].data for p in patches]).long()
    return batch


class PatchLoader(DataLoader):
    """The training loader, with the queue's position for Lightning's checkpoint.

    Lightning saves ``state_dict()`` of a training loader that has one and gives it back to
    ``load_state_dict()`` on resume, before the epoch restarts (``PatchPlanCallback``); the
    loader pops no batch ahead of the step (Lightning does not prefetch from a loader with a
    length), so the position is exactly the patches trained on.
    """

    def state_dict(self) -> dict[str, int]:
        assert isinstance(self.dataset, EpochQueue)
        return self.dataset.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        assert isinstance(self.dataset, EpochQueue)
        self.dataset.resume(state)


def build_patch_loader(queue: EpochQueue, batch_size: int) -> DataLoader:
    """The training loader: batches popped from the queue in the main process (the queue's own
    workers do the loading; TorchIO requires ``num_workers=0`` here), incomplete batches dropped."""
    queue.consumer_batch_size = int(batch_size)
    return PatchLoader(
        queue,
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        drop_last=True,
        collate_fn=collate_patches,
    )
