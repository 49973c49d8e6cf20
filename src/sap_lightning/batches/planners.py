"""Epoch plans of training patches: which case, and which window of it, every patch comes from.

A *plan* is the list of patch tasks of one epoch. It is drawn from a generator seeded with
``(seed, epoch)`` only, so every DDP rank computes the very same plan without communicating;
ranks then take disjoint shares of it (``queue.py``). A new epoch gives a new plan.

Each :class:`PatchTask` names a case, a *region* (the window the patch must lie in) and a
*focus* (a box the patch must contain when it fits). The patch dataset (``subjects.py``) picks
the patch origin inside those bounds with a per-task generator (:func:`choose_patch_origin`) and
reads only that patch from the memory-mapped cache.

Three planners:

- :class:`InstanceBalancedPlanner` (lesion, docs/method.md "IB-sampling"): one positive task per
  lesion per epoch and as many lesion-free negatives inside the body. The authors' defects are
  avoided by construction: one shared plan split across ranks (no lesion seen twice or never),
  a fresh draw every epoch (negatives change), negative centres inside the body mask only.
- :class:`ClassBalancedPlanner` (skeleton): a share ``data.class_fraction`` of the patches draws
  a foreground class uniformly, then a case holding it, then one of its precomputed voxel
  locations, and contains that voxel, so small classes (sternum, clavicles) are seen as often as
  large ones; the rest are centred uniformly in the body (nnU-Net's foreground oversampling), so
  the network also sees the soft tissue and unlabelled bone far from the labelled skeleton.
- :class:`BodyUniformPlanner` (SSL): patch centres uniform inside the body.

Every planner gives a fixed number of tasks per epoch, rounded up to a multiple of
``world size x batch size`` so that every rank runs the same number of full batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sap_lightning.config.schema import DataConfig
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.registry import Registry

if TYPE_CHECKING:
    from sap_lightning.batches.store import CaseStore

POSITIVE = "positive"
NEGATIVE = "negative"
CLASS = "class"
BODY = "body"

Box = tuple[int, int, int, int, int, int]
"""``(x0, y0, z0, x1, y1, z1)`` in voxels, start inclusive, stop exclusive (as ``LesionInfo``)."""

MAX_TRIES_PER_CASE = 200
"""Rejection-sampling attempts for a body-centred (lesion-free) window before another case is
tried; a body fills a large part of its bounding box, so a handful usually suffice."""


@dataclass(frozen=True)
class PatchTask:
    """One training patch of an epoch plan."""

    index: int
    """Position in the epoch plan (the same on every rank)."""
    case_id: str
    kind: str
    """``positive`` / ``negative`` (lesion), ``class`` (skeleton) or ``body`` (SSL)."""
    region: Box
    """The patch lies inside this window (where the volume allows)."""
    focus: Box
    """The patch contains this box when it fits in a patch, else lies inside it: the lesion's
    bounding box (positive), the drawn class voxel (class) or body voxel (negative, body)."""
    target: int = 0
    """Lesion component id (positive) or class value (class); 0 otherwise."""


def round_up(count: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``count``."""
    return int(math.ceil(count / multiple) * multiple)


def plan_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's plan: a function of ``(seed, epoch)`` only, so identical on
    every rank. A seed *sequence* rather than ``seed + epoch``, so that (seed 0, epoch 1) and
    (seed 1, epoch 0) do not give the same plan."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def _window_around(centre: np.ndarray, size: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Origin of a ``size`` window centred on ``centre``, shifted to lie inside ``shape`` (when
    the volume is smaller than the window it starts at 0 and is padded when read)."""
    origin = centre - size // 2
    return np.maximum(np.minimum(origin, shape - size), 0)


def _box(lo: Sequence[int], hi: Sequence[int]) -> Box:
    return tuple(int(v) for v in (*lo, *hi))  # type: ignore[return-value]


def _boxes_intersect(a: Box, b: Box) -> bool:
    return all(a[i] < b[i + 3] and b[i] < a[i + 3] for i in range(3))


def positive_region(bbox: Box, patch: np.ndarray, shape: np.ndarray, margin: int, scale: float):
    """The region a lesion's positive patch is cut from: its bounding box plus ``margin`` voxels,
    enlarged (about its centre) to at least ``scale`` x the patch, moved inside the volume and
    clipped to it."""
    lo = np.asarray(bbox[:3]) - margin
    hi = np.asarray(bbox[3:]) + margin
    minimum = np.ceil(scale * patch).astype(int)
    grow = np.maximum(minimum - (hi - lo), 0)
    lo, hi = lo - grow // 2, hi + (grow - grow // 2)
    shift = np.maximum(-lo, 0) - np.maximum(hi - shape, 0)  # move inside where it fits
    lo, hi = np.maximum(lo + shift, 0), np.minimum(hi + shift, shape)
    return _box(lo, hi)


def origin_bounds(task: PatchTask, patch: np.ndarray, shape: np.ndarray):
    """Lowest and highest (inclusive) patch origin per axis for ``task``.

    The patch lies in the task's region and contains its focus box along every axis where the
    focus fits in a patch; along an axis where it does not, the patch lies inside the focus.
    When the volume is smaller than the patch along an axis, the origin is negative and fixed:
    the patch is centred and the missing part is padded.
    """
    r_lo, r_hi = np.asarray(task.region[:3]), np.asarray(task.region[3:])
    f_lo, f_hi = np.asarray(task.focus[:3]), np.asarray(task.focus[3:])
    fits = f_hi - f_lo <= patch
    lo = np.where(fits, np.maximum(r_lo, f_hi - patch), np.maximum(r_lo, f_lo))
    hi = np.where(fits, np.minimum(r_hi - patch, f_lo), np.minimum(r_hi - patch, f_hi - patch))
    small = shape < patch
    centred = -((patch - shape) // 2)
    lo = np.where(small, centred, lo)
    hi = np.where(small, centred, hi)
    if np.any(hi < lo):  # only reachable with a hand-made task whose focus leaves the region
        raise ValueError(f"task {task}: no patch origin satisfies region and focus")
    return lo, hi


def choose_patch_origin(
    task: PatchTask,
    patch: np.ndarray,
    shape: np.ndarray,
    rng: np.random.Generator,
    focus_voxel: Callable[[], np.ndarray | None] | None = None,
) -> np.ndarray:
    """Draw the patch origin of ``task`` uniformly among the allowed ones.

    When the focus is larger than the patch along some axis (a lesion bigger than a patch),
    lying inside its bounding box does not guarantee a lesion voxel in view: ``focus_voxel``
    (called only then) returns one foreground voxel inside the focus, and the patch is made to
    contain it.
    """
    lo, hi = origin_bounds(task, patch, shape)
    focus_size = np.asarray(task.focus[3:]) - np.asarray(task.focus[:3])
    if focus_voxel is not None and np.any(focus_size > patch) and np.all(shape >= patch):
        voxel = focus_voxel()
        if voxel is not None:
            lo = np.maximum(lo, voxel - patch + 1)
            hi = np.minimum(hi, voxel)
    return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)], dtype=int)


# --------------------------------------------------------------------------- planners


PLANNERS: Registry[type[PatchPlanner]] = Registry("patch planner", "data.sampler")
register_planner = PLANNERS.register
"""Decorator: ``@register_planner("name")`` on a :class:`PatchPlanner` subclass."""


def list_planners() -> list[str]:
    return PLANNERS.names()


class PatchPlanner:
    """Base of the planners: the training cases, the patch size, the run seed, and a fixed
    number of tasks per epoch (``num_tasks``) drawn by ``plan(epoch)``.

    A subclass registered with ``@register_planner("name")`` is chosen by ``data.sampler``; it
    says what its cases must carry (``requires``) and builds itself from the config in
    ``from_config`` (docs/extending.md).
    """

    requires = "none"
    """``lesion`` (lesion labels), ``labels`` (any segmentation labels) or ``none``."""

    @classmethod
    def from_config(
        cls,
        store: CaseStore,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        seed: int,
        *,
        count: int,
        multiple: int,
        data: DataConfig,
    ) -> PatchPlanner:
        """Build from the DataModule's arguments: ``count`` patches per epoch over all ranks
        (planners with their own count ignore it), plans a multiple of ``multiple``."""
        return cls(store, case_ids, patch_size, seed, count, multiple)  # type: ignore[call-arg]

    def __init__(
        self, store: CaseStore, case_ids: Sequence[str], patch_size: Sequence[int], seed: int
    ) -> None:
        if not case_ids:
            raise DatasetError(f"cache {store.root}: no training cases to sample patches from")
        self.store = store
        self.case_ids = list(case_ids)
        self.patch = np.asarray(patch_size, dtype=int)
        self.seed = int(seed)
        self.shapes = {c: np.asarray(store.meta(c)["shape"], dtype=int) for c in self.case_ids}

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def plan(self, epoch: int) -> list[PatchTask]:
        raise NotImplementedError

    def _body_window(
        self, case_id: str, rng: np.random.Generator, avoid: Sequence[Box] = ()
    ) -> tuple[Box, Box] | None:
        """A patch window centred on a random body voxel (moved inside the volume at its
        borders) and overlapping none of the boxes ``avoid``, with that voxel's box; rejection
        sampling inside the body's bounding box, ``None`` when nothing was found. In a cache
        with an ``ignore`` label the centre is also an annotated voxel (nnU-Net's rule); the
        check draws nothing, so caches without one see the same draws as without the check."""
        shape = self.shapes[case_id]
        case = self.store.get(case_id)
        body = case.body_mask
        ignore = self.store.cache.ignore_value
        ignored = case.label if ignore is not None and case.label is not None else None
        bbox = np.asarray(self.store.meta(case_id).get("body_bbox") or [0, 0, 0, *shape])
        b_lo, b_hi = bbox[:3], bbox[3:]
        if np.any(b_hi <= b_lo):
            return None
        for _ in range(MAX_TRIES_PER_CASE):
            centre = rng.integers(b_lo, b_hi)
            if not body[tuple(centre)]:
                continue
            if ignored is not None and ignored[tuple(centre)] == ignore:
                continue
            origin = _window_around(centre, self.patch, shape)
            window = _box(origin, origin + self.patch)
            if not any(_boxes_intersect(window, box) for box in avoid):
                return window, _box(centre, centre + 1)
        return None

    def _body_tasks(
        self,
        count: int,
        kind: str,
        rng: np.random.Generator,
        avoid: dict[str, list[Box]] | None = None,
    ) -> list[PatchTask]:
        """``count`` body-centred windows (lesion-free when ``avoid`` lists the lesion boxes),
        each from a case drawn uniformly; a case where none is found is dropped for the epoch."""
        avoid = avoid or {}
        candidates = list(self.case_ids)
        tasks: list[PatchTask] = []
        while len(tasks) < count:
            if not candidates:
                what = "lesion-free " if avoid else ""
                raise DatasetError(
                    f"cache {self.store.root}: found no {what}window of {tuple(self.patch)} "
                    f"voxels centred in the body of any training case ({', '.join(self.case_ids)})"
                    "; use a smaller data.patch_size"
                )
            case_id = candidates[rng.integers(len(candidates))]
            found = self._body_window(case_id, rng, avoid.get(case_id, ()))
            if found is None:
                candidates.remove(case_id)
                continue
            window, centre = found
            tasks.append(PatchTask(-1, case_id, kind, window, centre))
        return tasks

    @staticmethod
    def _shuffled(tasks: list[PatchTask], rng: np.random.Generator) -> list[PatchTask]:
        """Tasks in a random order, numbered by their position in the plan."""
        order = rng.permutation(len(tasks))
        return [
            PatchTask(i, t.case_id, t.kind, t.region, t.focus, t.target)
            for i, t in enumerate(tasks[j] for j in order)
        ]


@register_planner("instance_balanced")
class InstanceBalancedPlanner(PatchPlanner):
    """One positive patch per lesion and as many lesion-free negatives inside the body, per epoch.

    The negative count is the positive count rounded up to make the plan a multiple of
    ``multiple`` (world size x batch size), so every rank gets the same number of full batches
    while every lesion still appears exactly once.
    """

    requires = "lesion"

    @classmethod
    def from_config(cls, store, case_ids, patch_size, seed, *, count, multiple, data):  # type: ignore[override]
        return cls(
            store,
            case_ids,
            patch_size,
            seed,
            margin=data.positive_margin,
            min_scale=data.positive_min_scale,
            multiple=multiple,
        )

    def __init__(
        self,
        store: CaseStore,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        seed: int,
        margin: int = 10,
        min_scale: float = 4.0 / 3.0,
        multiple: int = 1,
    ) -> None:
        super().__init__(store, case_ids, patch_size, seed)
        if margin < 0 or min_scale < 1.0:
            raise DatasetError(
                f"positive_margin must be >= 0 and positive_min_scale >= 1, got {margin}, "
                f"{min_scale}"
            )
        self.positives: list[PatchTask] = []
        self.lesion_boxes: dict[str, list[Box]] = {}
        for case_id in self.case_ids:
            lesions = store.get(case_id).lesions
            self.lesion_boxes[case_id] = [lesion.bbox for lesion in lesions]
            for lesion in lesions:
                region = positive_region(
                    lesion.bbox, self.patch, self.shapes[case_id], margin, min_scale
                )
                self.positives.append(
                    PatchTask(-1, case_id, POSITIVE, region, lesion.bbox, lesion.component_id)
                )
        if not self.positives:
            raise DatasetError(
                f"cache {store.root}: the {len(self.case_ids)} training cases hold no lesion; "
                "instance-balanced sampling needs at least one (choose data.sampler=uniform)"
            )
        total = round_up(2 * len(self.positives), multiple)
        self.num_negatives = total - len(self.positives)

    @property
    def num_tasks(self) -> int:
        return len(self.positives) + self.num_negatives

    def plan(self, epoch: int) -> list[PatchTask]:
        rng = plan_rng(self.seed, epoch)
        negatives = self._body_tasks(self.num_negatives, NEGATIVE, rng, self.lesion_boxes)
        return self._shuffled([*self.positives, *negatives], rng)


@register_planner("class_balanced")
class ClassBalancedPlanner(PatchPlanner):
    """Class-balanced patches mixed with body-uniform ones.

    ``round(class_fraction x count)`` patches per epoch are class-balanced: class uniform over the
    foreground classes present, case uniform among the cases holding it, location uniform among
    the case's stored voxels of that class; the patch contains the location at a uniformly drawn
    offset. The others are centred on a uniformly drawn body voxel: with class-balanced patches
    only, the skeleton network rarely saw soft tissue far from bone and labelled more of it as
    bone than the skeleton's own volume (docs/method.md, "CPU recipe").
    """

    requires = "labels"

    @classmethod
    def from_config(cls, store, case_ids, patch_size, seed, *, count, multiple, data):  # type: ignore[override]
        return cls(
            store,
            case_ids,
            patch_size,
            seed,
            count,
            multiple,
            class_fraction=data.class_fraction,
        )

    def __init__(
        self,
        store: CaseStore,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        seed: int,
        count: int,
        multiple: int = 1,
        class_fraction: float = 1.0,
    ) -> None:
        super().__init__(store, case_ids, patch_size, seed)
        if not 0.0 <= class_fraction <= 1.0:
            raise DatasetError(f"data.class_fraction must lie in [0, 1], got {class_fraction}")
        self.cases_of_class: dict[int, list[str]] = {}
        for case_id in self.case_ids:
            for value, locations in store.get(case_id).class_locations.items():
                if value != 0 and len(locations):
                    self.cases_of_class.setdefault(int(value), []).append(case_id)
        if not self.cases_of_class:
            raise DatasetError(
                f"cache {store.root}: no foreground voxel in any training case "
                f"({', '.join(self.case_ids)}); class-balanced sampling needs labels"
            )
        self.classes = sorted(self.cases_of_class)
        self._count = round_up(max(int(count), 1), multiple)
        self.num_class_tasks = round(class_fraction * self._count)

    @property
    def num_tasks(self) -> int:
        return self._count

    def plan(self, epoch: int) -> list[PatchTask]:
        rng = plan_rng(self.seed, epoch)
        tasks = self._body_tasks(self._count - self.num_class_tasks, BODY, rng)
        for _ in range(self.num_class_tasks):
            value = self.classes[rng.integers(len(self.classes))]
            holders = self.cases_of_class[value]
            case_id = holders[rng.integers(len(holders))]
            locations = self.store.get(case_id).class_locations[value]
            voxel = np.asarray(locations[rng.integers(len(locations))], dtype=int)
            shape = self.shapes[case_id]
            region = _box(
                np.maximum(voxel - self.patch + 1, 0), np.minimum(voxel + self.patch, shape)
            )
            tasks.append(PatchTask(-1, case_id, CLASS, region, _box(voxel, voxel + 1), value))
        return self._shuffled(tasks, rng)


@register_planner("uniform")
class BodyUniformPlanner(PatchPlanner):
    """Patches centred on voxels drawn uniformly inside the body of a uniformly drawn case."""

    def __init__(
        self,
        store: CaseStore,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        seed: int,
        count: int,
        multiple: int = 1,
    ) -> None:
        super().__init__(store, case_ids, patch_size, seed)
        self._count = round_up(max(int(count), 1), multiple)

    @property
    def num_tasks(self) -> int:
        return self._count

    def plan(self, epoch: int) -> list[PatchTask]:
        rng = plan_rng(self.seed, epoch)
        return self._shuffled(self._body_tasks(self._count, BODY, rng), rng)


class EpochPlan:
    """The current epoch's tasks of a planner; ``set_epoch`` draws a new plan.

    Its length never changes between epochs (the planner fixes the task count), which is what
    lets every rank run the same number of steps.
    """

    def __init__(self, planner: PatchPlanner, epoch: int = 0) -> None:
        self.planner = planner
        self.epoch = int(epoch)
        self.tasks = planner.plan(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.tasks = self.planner.plan(self.epoch)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> PatchTask:
        return self.tasks[index]
