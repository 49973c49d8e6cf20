"""From image headers to stations: T1 or DWI, b-values, derived frames, slice order, repeats.

Nothing here trusts file names, InstanceNumber or the order SimpleITK/GDCM would give: GDCM
groups by SeriesInstanceUID only and sorts by position, so b50 and b1000 of one DWI series, which
sit at the same positions, would interleave into one nonsense volume. Files are grouped by
series, b-value and slice geometry, and sorted by their ImagePositionPatient projected on the
slice normal (row cosine x column cosine).

Decisions, in the order they are taken (docs/scanner.md states them for users):

* a series carrying a b-value is DWI; one without is a T1 candidate (``--t1`` / ``--dwi``
  narrow both by SeriesDescription); localisers and other non-volumes (< 3 slices per stack) and,
  without ``--t1``, scanner-derived non-DWI series are not used;
* computed maps (ImageType ADC / EADC / FA) are dropped, and in a series that mixes acquired
  (ORIGINAL) and derived frames the derived ones are dropped: Philips appends its computed
  isotropic and ADC images to the acquired ones. A series that is derived throughout (Siemens
  trace-weighted DWI) is kept;
* one series may hold several stations: slices are split by orientation, matrix, pixel spacing
  and in-plane position;
* two slices at one position are refused, naming both files; a spacing step that is a whole
  multiple of the regular step is a gap (recorded, filled later), any other step is refused;
* two stacks covering mostly the same volume are one station acquired twice: the newer series
  is kept if both have the same description, else the import cannot tell which to use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.scanner.dicom_files import SliceHeader

MIN_SLICES = 3
"""Stacks with fewer slices are not volumes (localisers, single reference slices)."""
DUPLICATE_MM = 0.01
"""Two slices closer than this along the normal are at the same position."""
STEP_TOLERANCE = 0.1
"""A spacing step within this fraction of a whole multiple of the regular step is regular
(multiple 1) or a gap (multiple >= 2); anything else is irregular and refused."""
MAX_FILLED_SLICES = 2
"""Gaps of at most this many consecutive missing slices are filled; wider ones are refused."""
SAME_STATION_OVERLAP = 0.5
"""Two stacks whose bounding boxes share more than this fraction of the smaller one's volume
are the same station (acquired twice, or two contrasts at one position)."""
COMPUTED_MAPS = frozenset({"ADC", "EADC", "FA", "TRACE_ADC"})
"""ImageType values of computed parameter maps, never an acquired image."""


@dataclass
class Series:
    """The image files of one SeriesInstanceUID."""

    uid: str
    description: str
    number: int | None
    time: str
    slices: list[SliceHeader]

    @property
    def b_values(self) -> list[float]:
        return sorted({s.b_value for s in self.slices if s.b_value is not None})

    def record(self, **extra: object) -> dict:
        """The series as the manifest names it."""
        return {
            "uid": self.uid,
            "description": self.description,
            "number": self.number,
            "files": len(self.slices),
            **extra,
        }

    def label(self) -> str:
        return f"series {self.uid} ({self.description or 'no description'})"


@dataclass
class Stack:
    """One station of one series at one b-value: slices sorted along the normal, LPS mm."""

    case_id: str
    series: Series
    b_value: float | None
    slices: list[SliceHeader]
    positions: np.ndarray
    """Slice positions along the normal (mm), ascending."""
    step: float
    """Regular slice spacing along the normal (mm)."""
    index: np.ndarray
    """Regular slice index of each slice (gaps leave indices out)."""
    gaps: list[dict] = field(default_factory=list)

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def n_slices(self) -> int:
        """Slices of the regular stack, missing ones included."""
        return int(self.index[-1]) + 1

    @property
    def direction(self) -> np.ndarray:
        """3 x 3, columns: along a row (column index), along a column (row index), normal."""
        h = self.first
        return np.column_stack([h.row_cosine, h.column_cosine, h.normal])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(column spacing, row spacing, slice step): SimpleITK's x, y, z order."""
        return (self.first.pixel_spacing[1], self.first.pixel_spacing[0], self.step)

    @property
    def size(self) -> tuple[int, int, int]:
        return (self.first.columns, self.first.rows, self.n_slices)

    def corners(self) -> np.ndarray:
        """The 8 outer corners of the stack (voxel edges, not centres), 8 x 3 LPS mm."""
        size, spacing = np.asarray(self.size, float), np.asarray(self.spacing)
        unit = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
        index = unit * size - 0.5
        return np.asarray(self.first.position) + (index * spacing) @ self.direction.T

    def label(self) -> str:
        b = "" if self.b_value is None else f", b={self.b_value:g}"
        return f"{self.series.label()}{b}"


@dataclass
class Station:
    """One position of one contrast: a T1 stack, or a DWI stack per b-value on one grid."""

    series: Series
    stacks: dict[float | None, Stack]

    @property
    def reference(self) -> Stack:
        """The stack that places the station (DWI: the lowest b-value)."""
        return self.stacks[min(self.stacks, key=lambda b: -1.0 if b is None else b)]

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        corners = self.reference.corners()
        return corners.min(axis=0), corners.max(axis=0)

    def centre(self) -> np.ndarray:
        low, high = self.box()
        return (low + high) / 2


def group_series(slices: Sequence[SliceHeader]) -> list[Series]:
    """Image files grouped by SeriesInstanceUID, in series number / time order."""
    by_uid: dict[str, list[SliceHeader]] = {}
    for header in slices:
        by_uid.setdefault(header.series_uid, []).append(header)
    series = []
    for uid, members in by_uid.items():
        first = members[0]
        series.append(
            Series(uid, first.series_description, first.series_number, first.series_time, members)
        )
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.time, s.uid))


# --------------------------------------------------------------------------- derived frames


def drop_derived(series: Series) -> list[dict]:
    """Remove computed frames from ``series`` in place; returns what was dropped and why."""
    dropped: dict[str, int] = {}
    acquired = any(s.image_type[:1] == ("ORIGINAL",) for s in series.slices)
    kept = []
    for header in series.slices:
        maps = COMPUTED_MAPS.intersection(header.image_type)
        if maps:
            reason = f"computed map (ImageType {'/'.join(sorted(maps))})"
        elif acquired and header.image_type[:1] == ("DERIVED",):
            reason = "derived frames appended to acquired ones (ImageType DERIVED"
            if header.diffusion_directionality:
                reason += f", DiffusionDirectionality {header.diffusion_directionality}"
            reason += ")"
        else:
            kept.append(header)
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
    series.slices = kept
    return [series.record(files=count, reason=reason) for reason, count in dropped.items()]


# --------------------------------------------------------------------------- roles


@dataclass
class Roles:
    """The series an exam's channels come from, and those set aside with the reason."""

    t1: list[Series]
    dwi: list[Series]
    ignored: list[dict]


def _matches(pattern: str | None, series: Series) -> bool:
    return pattern is None or re.search(pattern, series.description, re.IGNORECASE) is not None


def assign_roles(
    case_id: str, series: Sequence[Series], t1: str | None = None, dwi: str | None = None
) -> Roles:
    """T1 and DWI series of one exam (``t1`` / ``dwi``: SeriesDescription regexes)."""
    roles = Roles([], [], [])
    for one in series:
        if not one.slices:
            continue
        if one.b_values:
            if _matches(dwi, one):
                roles.dwi.append(one)
            else:
                roles.ignored.append(one.record(reason=f"DWI not matching --dwi {dwi!r}"))
            continue
        if dwi is not None and _matches(dwi, one) and t1 is None:
            raise DatasetError(
                f"case {case_id}: {one.label()} matches --dwi {dwi!r} but no file carries a "
                "b-value ((0018,9087) or a vendor tag; anonymisers may remove private tags)"
            )
        if not _matches(t1, one):
            roles.ignored.append(one.record(reason=f"not matching --t1 {t1!r}"))
        elif t1 is None and all(s.image_type[:1] == ("DERIVED",) for s in one.slices):
            roles.ignored.append(
                one.record(reason="derived series (ImageType DERIVED); --t1 selects it")
            )
        else:
            roles.t1.append(one)
    described = ", ".join(f"{s.description or s.uid!r}" for s in series) or "none"
    if not roles.t1:
        raise DatasetError(
            f"case {case_id}: no T1 series (series: {described}); pass --t1 REGEX to name it"
        )
    if not roles.dwi:
        raise DatasetError(
            f"case {case_id}: no DWI series: no file carries a b-value in (0018,9087) or the "
            f"Siemens, GE or Philips tags (series: {described}); anonymisers may remove them"
        )
    return roles


# --------------------------------------------------------------------------- stacks


def _geometry_groups(slices: Sequence[SliceHeader]) -> list[list[SliceHeader]]:
    """Slices split by orientation, matrix, pixel spacing and in-plane position."""
    groups: list[tuple[np.ndarray, list[SliceHeader]]] = []
    for header in slices:
        row, column = np.asarray(header.row_cosine), np.asarray(header.column_cosine)
        key = np.concatenate(
            [
                row,
                column,
                [header.rows, header.columns],
                header.pixel_spacing,
                [np.dot(header.position, row), np.dot(header.position, column)],
            ]
        )
        tolerance = np.concatenate([[1e-4] * 6, [0.5, 0.5], [1e-3, 1e-3], [0.05, 0.05]])
        for group_key, members in groups:
            if np.all(np.abs(group_key - key) <= tolerance):
                members.append(header)
                break
        else:
            groups.append((key, [header]))
    return [members for _, members in groups]


def _sorted_stack(
    case_id: str, series: Series, b_value: float | None, slices: list[SliceHeader], root: Path
) -> Stack:
    """Sort one group along the normal; refuse duplicates and irregular steps, record gaps."""
    normal = slices[0].normal
    order = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    positions = np.array([np.dot(s.position, normal) for s in order])
    label = f"case {case_id}: {series.label()}" + ("" if b_value is None else f", b={b_value:g}")
    steps = np.diff(positions)
    for i in np.flatnonzero(steps < DUPLICATE_MM):
        raise DatasetError(
            f"{label}: {order[i].where(root)} and {order[i + 1].where(root)} lie at the same "
            f"position ({positions[i]:.2f} mm along the slice normal): duplicate slices (echoes, "
            "Dixon images, diffusion directions or two stations in one series?)"
        )
    step = float(np.median(steps))
    multiples = np.rint(steps / step)
    for i in np.flatnonzero(np.abs(steps / step - multiples) > STEP_TOLERANCE):
        raise DatasetError(
            f"{label}: {order[i].where(root)} -> {order[i + 1].where(root)}: slice step "
            f"{steps[i]:.3f} mm is not a multiple of the regular {step:.3f} mm"
        )
    gaps = []
    for i in np.flatnonzero(multiples >= 2):
        missing = int(multiples[i]) - 1
        if missing > MAX_FILLED_SLICES:
            raise DatasetError(
                f"{label}: {missing} slices missing between {order[i].where(root)} and "
                f"{order[i + 1].where(root)} (at most {MAX_FILLED_SLICES} are filled)"
            )
        gaps.append(
            {
                "after_file": order[i].where(root),
                "missing_slices": missing,
                "position_mm": [round(positions[i] + step * (k + 1), 3) for k in range(missing)],
                "filled": "linear interpolation between the neighbouring slices",
            }
        )
    index = np.concatenate([[0], np.cumsum(multiples)]).astype(int)
    return Stack(case_id, series, b_value, order, positions, step, index, gaps)


def split_stacks(case_id: str, series: Series, root: Path, dwi: bool) -> tuple[list[Stack], list]:
    """The stacks of one series (per b-value and geometry) and the non-volumes set aside.

    In a DWI series, frames without a b-value are taken as b=0 (Canon leaves (0018,9087) out
    when b is 0).
    """
    by_b: dict[float | None, list[SliceHeader]] = {}
    for header in series.slices:
        b = header.b_value if not dwi else (header.b_value or 0.0)
        by_b.setdefault(b, []).append(header)
    stacks, small = [], []
    for b_value in sorted(by_b, key=lambda b: -1.0 if b is None else b):
        for group in _geometry_groups(by_b[b_value]):
            if len(group) < MIN_SLICES:
                small.append(len(group))
                continue
            stacks.append(_sorted_stack(case_id, series, b_value, group, root))
    ignored = []
    if small:
        ignored.append(
            series.record(
                files=sum(small), reason=f"not a volume: {len(small)} stack(s) of < {MIN_SLICES}"
            )
        )
    return stacks, ignored


def _same_grid(a: Stack, b: Stack) -> bool:
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, atol=1e-3)
        and np.allclose(a.first.position, b.first.position, atol=0.05)
    )


def stations_of(case_id: str, stacks: Sequence[Stack], root: Path) -> list[Station]:
    """Stacks of one series grouped into stations: all b-values of one position together."""
    stations: list[Station] = []
    for stack in stacks:
        for station in stations:
            reference = station.reference
            if reference.series is stack.series and _same_grid(reference, stack):
                station.stacks[stack.b_value] = stack
                break
        else:
            stations.append(Station(stack.series, {stack.b_value: stack}))
    for station in stations:
        series = station.series
        if len(series.b_values) > 1 and len(station.stacks) < len(series.b_values):
            missing = sorted(set(series.b_values) - set(station.stacks))
            where = station.reference.first.where(root)
            raise DatasetError(
                f"case {case_id}: {series.label()}: {where}: the stack at this position lacks "
                f"b={', '.join(f'{b:g}' for b in missing)} or lies on another grid"
            )
    return stations


def _overlap_fraction(a: Station, b: Station) -> float:
    (alo, ahi), (blo, bhi) = a.box(), b.box()
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None).prod()
    return float(inter / min(np.prod(ahi - alo), np.prod(bhi - blo)))


def _newer(a: Station, b: Station) -> Station | None:
    """The newer of two series (SeriesTime, then SeriesNumber), or ``None`` when undecidable."""
    key_a = (a.series.time, a.series.number or -1)
    key_b = (b.series.time, b.series.number or -1)
    if key_a == key_b:
        return None
    return a if key_a > key_b else b


def resolve_repeats(case_id: str, role: str, stations: list[Station]) -> tuple[list, list]:
    """Keep the newest of stations acquired twice at one position; refuse other overlaps.

    Returns the kept stations and the dropped ones' manifest records.
    """
    option = "--t1" if role == "T1" else "--dwi"
    kept: list[Station] = []
    dropped: list[dict] = []
    for station in stations:
        for i, other in enumerate(kept):
            if _overlap_fraction(station, other) <= SAME_STATION_OVERLAP:
                continue
            if station.series is other.series:
                continue
            if station.series.description != other.series.description:
                raise DatasetError(
                    f"case {case_id}: {station.series.label()} and {other.series.label()} "
                    f"cover the same station: cannot tell which is the {role}; pass {option} "
                    "REGEX (SeriesDescription) to choose"
                )
            newer = _newer(station, other)
            if newer is None:
                raise DatasetError(
                    f"case {case_id}: {station.series.label()} and {other.series.label()} "
                    "repeat one station with the same SeriesTime and number: remove one"
                )
            older = other if newer is station else station
            dropped.append(
                older.series.record(
                    reason=f"repeated {role} station: {newer.series.uid} is newer "
                    f"(SeriesTime {newer.series.time or '?'} > {older.series.time or '?'})"
                )
            )
            if newer is station:
                kept[i] = station
            break
        else:
            kept.append(station)
    return kept, dropped
