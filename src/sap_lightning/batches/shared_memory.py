"""How much shared memory (``/dev/shm``) the loaders of one training process need, checked
before a run starts.

Loader workers hand their results to the training process in shared memory: the patch ring
(``queue.py``, allocated once) and every whole validation case (one worker loads the next case
while the current one is scored). Docker gives a container 64 MB of ``/dev/shm`` unless told
otherwise; the paper's settings (96^3 two-channel patches, 4 workers, a queue of 32) need about
43 ring slots of 7.6 MiB per process, so a run used to end in a traceback ("unable to allocate
shared memory ... No space left on device") minutes in, at its first batch or validation. The
check refuses it at the start in one line naming the size and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap_lightning.batches.queue import LOADER_PREFETCH, ring_slots
from sap_lightning.core.errors import ConfigError

SHM_PATH = Path("/dev/shm")
"""Where PyTorch's shared memory lives on Linux (``shm_open``)."""

MIB = 1024**2


@dataclass(frozen=True)
class SharedMemoryNeed:
    """Bytes of shared memory one training process's loaders hold at most."""

    ring_slots: int
    patch_bytes: int
    validation_items: int
    validation_item_bytes: int

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.patch_bytes

    @property
    def validation_bytes(self) -> int:
        return self.validation_items * self.validation_item_bytes

    @property
    def total_bytes(self) -> int:
        return self.ring_bytes + self.validation_bytes

    def describe(self) -> str:
        return (
            f"patch ring {self.ring_slots} x {self.patch_bytes / MIB:.1f} MiB, validation "
            f"{self.validation_items} x {self.validation_item_bytes / MIB:.1f} MiB"
        )


def training_need(
    channels: int,
    patch_size: Sequence[int],
    label_itemsize: int | None,
    batch_size: int,
    queue_length: int,
    num_workers: int,
    validation_item_bytes: int,
) -> SharedMemoryNeed:
    """The shared memory of one process: the ring (only with loader workers; a patch is float32
    channels and, for segmentation, a label of ``label_itemsize`` bytes a voxel) and the
    validation items a worker holds (its prefetched ones and the one being scored)."""
    voxels = int(np.prod(patch_size))
    patch = voxels * (4 * channels + (label_itemsize or 0))
    slots = ring_slots(queue_length, batch_size, num_workers) if num_workers > 0 else 0
    items = LOADER_PREFETCH + 1 if num_workers > 0 else 0
    return SharedMemoryNeed(slots, patch, items, validation_item_bytes)


def whole_case_bytes(shape: Sequence[int], channels: int, with_label: bool) -> int:
    """A whole case as the validation loader sends it: float32 channels, a uint8 label and the
    boolean body mask."""
    return int(np.prod(shape)) * (4 * channels + (1 if with_label else 0) + 1)


def shm_free_bytes(path: Path = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory file system (None where there is none)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def suggested_shm_size(need_bytes: int) -> str:
    """A ``--shm-size`` with a quarter of headroom, in whole GiB (or MiB below 1 GiB)."""
    wanted = need_bytes * 1.25 + 64 * MIB  # torch's own small segments, other users
    if wanted < 1024 * MIB:
        return f"{math.ceil(wanted / MIB / 64) * 64}m"
    return f"{math.ceil(wanted / 1024**3)}g"


def check_shared_memory(
    need: SharedMemoryNeed, processes: int, path: Path = SHM_PATH, free_bytes: int | None = None
) -> None:
    """Refuse in one line when the ``processes`` of this node would not fit in ``path`` (its
    free space, or ``free_bytes``)."""
    free = shm_free_bytes(path) if free_bytes is None else free_bytes
    total = need.total_bytes * processes
    if free is None or total == 0 or total <= free:
        return
    who = "this process needs" if processes == 1 else f"this node's {processes} processes need"
    raise ConfigError(
        f"shared memory: {who} {total / MIB:.0f} MiB in {path} ({need.describe()} each), "
        f"but it has {free / MIB:.0f} MiB free; in a container start it with --shm-size="
        f"{suggested_shm_size(total)} or --ipc=host (or lower data.num_workers / "
        "data.queue_length)"
    )
