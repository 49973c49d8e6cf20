"""One exam end to end, and a folder of exams: ``sap import-dicom SRC OUT``.

Per case (``SRC/<case>/``, any files, any nesting): read the headers, choose the T1 and DWI
series, split and sort them into stations, read the pixels, optionally fit the ADC per station
(before anything changes the intensities) and correct the bias field (N4), compose the T1
stations onto the output grid, optionally register each DWI station to the composed T1, compose
the chosen b-value (and the ADC) onto the same grid, and resample the annotation, if any, with
nearest neighbour. Everything is computed in memory and written only when the whole case
succeeded (``output``); ``manifests/<case>.json`` records every decision.

A case that cannot be imported is refused with one line naming the case, the series and the file;
the other cases are still imported and the command then fails listing the refused ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sap_lightning import __version__
from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset.images import read_image
from sap_lightning.dataset.import_folder import resolve_labels
from sap_lightning.dataset.layout import FILE_ENDINGS, IGNORE_LABEL
from sap_lightning.scanner import adc as adc_fit
from sap_lightning.scanner import bias, output, register
from sap_lightning.scanner.dicom_files import scan_case
from sap_lightning.scanner.series import (
    Station,
    assign_roles,
    drop_derived,
    group_series,
    resolve_repeats,
    split_stacks,
    stations_of,
)
from sap_lightning.scanner.stacks import read_stack
from sap_lightning.scanner.stations import (
    Grid,
    Placed,
    compose,
    coverage,
    grid_box,
    output_grid,
    place,
    ramp_weights,
    resample_intensities,
    resample_onto,
    stacking_direction,
    standardisation_factors,
    station_order,
)

log = logging.getLogger(__name__)

DEFAULT_B_VALUE = 1000.0
REGISTRATION_MARGIN_MM = 40.0
"""The T1 a DWI station is registered to extends this far beyond the station on every side."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ImportOptions:
    """What ``sap import-dicom`` does beyond the defaults (docs/scanner.md)."""

    t1: str | None = None
    """SeriesDescription regex choosing the T1 series."""
    dwi: str | None = None
    """SeriesDescription regex choosing the DWI series."""
    b_value: float = DEFAULT_B_VALUE
    """The DWI channel is the b-value nearest this (s/mm^2)."""
    adc: bool = False
    n4: bool = False
    register: str | None = None
    """``rigid`` or ``translation``: register each DWI station to the T1 first."""
    labels: Path | None = None
    """Folder of ``<case>.nii.gz`` annotations in world space."""
    label_set: str | Mapping[str, int] = "lesion"

    @property
    def channels(self) -> list[str]:
        return ["T1", "b1000", *(["ADC"] if self.adc else [])]


@dataclass
class ImportedCase:
    """One case in memory: images as (x, y, z) arrays on one grid, its RAS affine, manifest."""

    case_id: str
    images: list[np.ndarray]
    affine: np.ndarray
    label: np.ndarray | None
    manifest: dict


@dataclass
class ImportReport:
    out: Path
    kind: str
    imported: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    cases_in_out: int = 0
    b_values: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- stations


def _stations(case_id: str, series: Sequence, root: Path, dwi: bool) -> tuple[list, list]:
    role = "DWI" if dwi else "T1"
    stations: list[Station] = []
    ignored: list[dict] = []
    for one in series:
        stacks, small = split_stacks(case_id, one, root, dwi)
        stations += stations_of(case_id, stacks, root)
        ignored += small
    if not stations:
        raise DatasetError(f"case {case_id}: no {role} volume (every {role} stack is too small)")
    kept, dropped = resolve_repeats(case_id, role, stations)
    return kept, ignored + dropped


def _choose_b_value(case_id: str, stations: Sequence[Station], options: ImportOptions) -> float:
    chosen = {
        min(station.stacks, key=lambda b: (abs(b - options.b_value), -b)) for station in stations
    }
    if len(chosen) > 1:
        raise DatasetError(
            f"case {case_id}: DWI stations differ in the b-value nearest {options.b_value:g} "
            f"({', '.join(f'{b:g}' for b in sorted(chosen))}); pass --b-value"
        )
    if options.adc:
        for station in stations:
            if len(station.stacks) < 2:
                raise DatasetError(
                    f"case {case_id}: {station.series.label()}: --adc needs two b-values, the "
                    f"station has only b={next(iter(station.stacks)):g}"
                )
    return chosen.pop()


def _station_record(station: Station, root: Path, order: int) -> dict:
    stack = station.reference
    return {
        "order": order,
        "uid": station.series.uid,
        "description": station.series.description,
        "files": sum(len(s.slices) for s in station.stacks.values()),
        "first_file": stack.first.where(root),
        "slices": stack.n_slices,
        "spacing_mm": [round(v, 4) for v in stack.spacing],
        "b_values": sorted(b for b in station.stacks if b is not None),
        "b_value_tags": sorted(
            {s.b_value_tag for st in station.stacks.values() for s in st.slices if s.b_value_tag}
        ),
        "gaps": [gap for s in station.stacks.values() for gap in s.gaps],
    }


def _n4(images: dict, record: dict) -> dict:
    """One field per station, estimated on its lowest b-value (or the T1) and divided out of all."""
    lowest = min(images, key=lambda b: -1.0 if b is None else b)
    log_field = bias.estimate_log_field(images[lowest])
    record["n4"] = "corrected" if log_field is not None else "no body found: not corrected"
    if log_field is None:
        return images
    return {b: bias.divide_field(image, log_field) for b, image in images.items()}


# --------------------------------------------------------------------------- composition


def _compose_t1(
    grid: Grid, images: Sequence[sitk.Image], records: list[dict]
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The composed T1, the voxels a T1 station covers ((z, y, x) bool) and the pairs' record."""
    direction = stacking_direction(images)
    order = station_order(images, direction)
    placed = [place(grid, images[i], ramp_weights(images[i], direction)) for i in order]
    factors, pairs = standardisation_factors(placed)  # type: ignore[arg-type]
    for position, (i, factor) in enumerate(zip(order, factors)):
        records[i].update(order=position, scale_factor=round(factor, 6))
    return compose(grid, placed, factors), coverage(grid, placed), pairs  # type: ignore[arg-type]


def _registrations(
    grid: Grid, t1: np.ndarray, images: Sequence[sitk.Image], kind: str, records: list[dict]
) -> list[sitk.Transform | None]:
    """Per DWI station, the transform from T1 to DWI points; the T1 is taken on the station's
    box of the grid widened by ``REGISTRATION_MARGIN_MM`` (room for the movement)."""
    transforms: list[sitk.Transform | None] = []
    margin = np.ceil(REGISTRATION_MARGIN_MM / np.asarray(grid.spacing)).astype(int)
    for image, record in zip(images, records):
        box = grid_box(grid, image)
        if box is None:
            transforms.append(None)
            continue
        low = np.maximum(np.asarray(box[0]) - margin, 0)
        high = np.minimum(np.asarray(box[1]) + margin, grid.size)
        cut = tuple(slice(lo, hi) for lo, hi in zip(low[::-1], high[::-1]))
        t1_box = sitk.GetImageFromArray(np.ascontiguousarray(t1[cut]))
        t1_box.CopyInformation(grid.reference(low, high))
        transform = register.register_station(t1_box, image, kind)
        record["registration"] = {"kind": kind, **register.describe(transform)}
        transforms.append(transform)
    return transforms


def _compose_dwi(
    grid: Grid,
    stations: Sequence[dict],
    b_used: float,
    transforms: Sequence[sitk.Transform | None],
    records: list[dict],
    adc: Sequence[sitk.Image] | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[dict]]:
    """The chosen b-value (standardised on each station's lowest b-value) and the ADC (never
    standardised), both blended with the same ramp weights, and the voxels a DWI station
    covers."""
    lowest = [station[min(station)] for station in stations]
    direction = stacking_direction(lowest)
    order = station_order(lowest, direction)
    placed_low: list[Placed] = []
    kept: list[int] = []
    for i in order:
        weights = ramp_weights(lowest[i], direction)
        placed = place(grid, lowest[i], weights, transforms[i])
        if placed is None:
            records[i]["dropped"] = "outside the T1 field of view"
            continue
        placed_low.append(placed)
        kept.append(i)
    if not placed_low:
        raise DatasetError("no DWI station overlaps the T1 field of view")
    factors, pairs = standardisation_factors(placed_low)

    def on_box(base: Placed, values: np.ndarray) -> Placed:
        return Placed(base.low, base.high, values, base.weights, base.core)

    chosen = []
    for i, base in zip(kept, placed_low):
        if min(stations[i]) != b_used:
            image = stations[i][b_used]
            base = on_box(
                base, resample_intensities(grid, image, base.low, base.high, transforms[i])
            )
        chosen.append(base)
    for position, (i, factor) in enumerate(zip(kept, factors)):
        records[i].update(order=position, scale_factor=round(factor, 6))
    b_image = compose(grid, chosen, factors)
    adc_image = None
    if adc is not None:
        adc_image = compose(
            grid,
            [
                on_box(b, resample_onto(grid, adc[i], b.low, b.high, transforms[i]))
                for i, b in zip(kept, placed_low)
            ],
        )
    return b_image, adc_image, coverage(grid, placed_low), pairs


# --------------------------------------------------------------------------- labels


def _to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A (x, y, z) array with a RAS affine as a SimpleITK (LPS) image."""
    lps = _LPS_TO_RAS @ np.asarray(affine, float)[:3, :]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:, :3] / spacing).flatten()))
    image.SetOrigin(tuple(float(v) for v in lps[:, 3]))
    return image


def ignore_value_of(label_set: Mapping[str, int]) -> int:
    """The value of the ``ignore`` label: the label set's own, else nnU-Net's rule (the highest
    value, one above the classes)."""
    return label_set.get(IGNORE_LABEL, max(label_set.values(), default=0) + 1)


def _label_on_grid(
    case_id: str, path: Path, grid: Grid, label_set: Mapping[str, int], imaged: np.ndarray
) -> tuple[np.ndarray, dict]:
    """The annotation on ``grid`` ((z, y, x), nearest neighbour in world space), with every
    voxel that is not ``imaged`` (no T1 or no DWI station covers it) or that the annotation's
    field of view misses marked as the ``ignore`` label: nobody could annotate it."""
    where = f"case {case_id}: {path}"
    try:
        source = read_image(path)
    except Exception as err:  # nibabel, SimpleITK and gzip raise many types on corrupt files
        raise DatasetError(f"{where}: unreadable label file ({err})") from err
    data = np.asarray(source.data)
    if data.ndim != 3:
        raise DatasetError(f"{where}: not a 3D label map: shape {data.shape}")
    if not np.all(np.isfinite(data)) or np.any(data != np.rint(data)):
        raise DatasetError(f"{where}: label values must be whole numbers")
    values = set(np.unique(data).astype(int).tolist())
    unknown = sorted(values - set(label_set.values()))
    if unknown:
        raise DatasetError(f"{where}: values {unknown} are not in the label set {dict(label_set)}")
    labels = _to_sitk(data.astype(np.uint8), source.affine)
    on_grid = resample_onto(grid, labels, interpolator=sitk.sitkNearestNeighbor)
    field_of_view = _to_sitk(np.ones(data.shape, np.uint8), source.affine)
    annotated = resample_onto(grid, field_of_view, interpolator=sitk.sitkNearestNeighbor) > 0
    ignored = ~(imaged & annotated)
    voxel_ml = float(np.prod(np.linalg.norm(source.affine[:3, :3], axis=0))) / 1000.0
    grid_ml = float(np.prod(grid.spacing)) / 1000.0
    source_ml, imported_ml = (
        float((data > 0).sum()) * voxel_ml,
        float((on_grid > 0).sum()) * grid_ml,
    )
    if source_ml > 0 and imported_ml == 0:
        raise DatasetError(f"{where}: no labelled voxel lies inside the T1 field of view")
    record = {
        "file": str(path),
        "values": sorted(values),
        "foreground_ml_source": round(source_ml, 4),
        "foreground_ml_imported": round(imported_ml, 4),
        "resampling": "nearest neighbour in world space",
        "ignored_voxels": int(ignored.sum()),
    }
    if ignored.any():
        on_grid = np.where(ignored, ignore_value_of(label_set), on_grid)
        record["ignore_value"] = ignore_value_of(label_set)
        record["ignored"] = "voxels no T1 or DWI station covers, or outside the annotation"
    return on_grid.astype(np.uint8), record


def _label_file(folder: Path, case_id: str) -> Path:
    """``folder/<case><ending>`` for any ending the library reads (``.nii.gz`` first)."""
    for ending in FILE_ENDINGS:
        if (folder / f"{case_id}{ending}").is_file():
            return folder / f"{case_id}{ending}"
    raise DatasetError(f"case {case_id}: {folder / case_id}.nii.gz: missing label")


# --------------------------------------------------------------------------- one case


def import_case(
    case_dir: str | os.PathLike,
    options: ImportOptions = ImportOptions(),
    label_file: Path | None = None,
    label_set: Mapping[str, int] | None = None,
) -> ImportedCase:
    """Import one exam folder into memory (nothing is written)."""
    case_dir = Path(case_dir)
    case_id, root = case_dir.name, case_dir.parent
    scan = scan_case(case_dir)
    all_series = group_series(scan.slices)
    dropped: list[dict] = []
    for one in all_series:
        dropped += drop_derived(one)
    roles = assign_roles(case_id, all_series, options.t1, options.dwi)
    dropped += roles.ignored
    t1_stations, more = _stations(case_id, roles.t1, root, dwi=False)
    dropped += more
    dwi_stations, more = _stations(case_id, roles.dwi, root, dwi=True)
    dropped += more
    b_used = _choose_b_value(case_id, dwi_stations, options)

    t1_records = [_station_record(s, root, i) for i, s in enumerate(t1_stations)]
    dwi_records = [_station_record(s, root, i) for i, s in enumerate(dwi_stations)]
    t1_images = [{None: read_stack(s.reference, root)} for s in t1_stations]
    # Every b-value for the ADC fit; else the lowest (standardisation, registration) and the used.
    dwi_images = [
        {
            b: read_stack(stack, root)
            for b, stack in s.stacks.items()
            if options.adc or b in (min(s.stacks), b_used)
        }
        for s in dwi_stations
    ]
    adc_stations = [adc_fit.adc_image(images) for images in dwi_images] if options.adc else None
    if options.n4:
        t1_images = [_n4(images, r) for images, r in zip(t1_images, t1_records)]
        dwi_images = [_n4(images, r) for images, r in zip(dwi_images, dwi_records)]

    t1_list = [images[None] for images in t1_images]
    grid = output_grid(t1_list)
    t1, t1_covered, t1_pairs = _compose_t1(grid, t1_list, t1_records)
    transforms: list[sitk.Transform | None] = [None] * len(dwi_images)
    if options.register:
        lowest = [images[min(images)] for images in dwi_images]
        transforms = _registrations(grid, t1, lowest, options.register, dwi_records)
    try:
        b_image, adc, dwi_covered, dwi_pairs = _compose_dwi(
            grid, dwi_images, b_used, transforms, dwi_records, adc_stations
        )
    except DatasetError as err:
        raise DatasetError(f"case {case_id}: {err}") from err
    arrays = [t1, b_image] + ([adc] if adc is not None else [])
    images = [np.transpose(a, (2, 1, 0)) for a in arrays]  # (z, y, x) -> NIfTI (x, y, z)

    label, label_record = None, None
    if label_file is not None:
        imaged = t1_covered & dwi_covered
        on_grid, label_record = _label_on_grid(case_id, label_file, grid, label_set or {}, imaged)
        label = np.transpose(on_grid, (2, 1, 0))

    manifest = {
        "case": case_id,
        "written_by": f"sap import-dicom (sap_lightning {__version__})",
        "source": str(case_dir),
        "layout": output.DATASET if label_file is not None else output.PLAIN,
        "channels": options.channels,
        "options": {
            "t1": options.t1,
            "dwi": options.dwi,
            "b_value": options.b_value,
            "adc": options.adc,
            "n4": options.n4,
            "register": options.register,
        },
        "files": {
            "dicom_images": len(scan.slices),
            "not_dicom": scan.not_dicom,
            "dicom_not_images": scan.not_images,
        },
        "t1": {
            "stations": sorted(t1_records, key=lambda r: r["order"]),
            "standardisation": t1_pairs,
        },
        "dwi": {
            "b_values": sorted({b for s in dwi_stations for b in s.stacks}),
            "b_value_used": b_used,
            "stations": sorted(dwi_records, key=lambda r: r.get("order", len(dwi_records))),
            "standardisation": dwi_pairs,
            "standardised_on": "each station's lowest b-value; one factor for all its b-values",
        },
        "dropped": dropped,
        "output_grid": grid.record(),
    }
    frames = {
        h.frame_of_reference
        for station in [*t1_stations, *dwi_stations]
        for stack in station.stacks.values()
        for h in stack.slices
    }
    if len(frames) > 1:
        # Positions of different frames of reference need not share an origin: the composed
        # image is only right if the scanner kept one table reference, as it does within a study.
        manifest["warnings"] = [
            f"{len(frames)} FrameOfReferenceUIDs among the series used: positions were taken "
            "as one coordinate system"
        ]
        log.warning("case %s: %s", case_id, manifest["warnings"][0])
    if adc is not None:
        manifest["adc"] = {
            "unit": "1e-3 mm^2/s",
            "fit": "log-linear least squares over every b-value, per station, before "
            "standardisation; background 0, clipped to [0, 5]",
        }
    if label_record is not None:
        manifest["label"] = label_record
    return ImportedCase(case_id, images, grid.affine_ras(), label, manifest)


# --------------------------------------------------------------------------- a folder


def import_dicom(
    src: str | os.PathLike, out: str | os.PathLike, options: ImportOptions = ImportOptions()
) -> ImportReport:
    """Import every case folder of ``src`` into ``out`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"import-dicom: {src}: source folder does not exist")
    case_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise DatasetError(f"import-dicom: {src}: no case folders (<case>/ with DICOM files)")
    kind = output.DATASET if options.labels is not None else output.PLAIN
    label_set: dict[str, int] = {}
    if options.labels is not None:
        if not options.labels.is_dir():
            raise DatasetError(f"import-dicom: --labels {options.labels}: no such folder")
        label_set, _ = resolve_labels(options.label_set)
    output.check_out(out, kind, options.channels)
    report = ImportReport(out, kind)
    for case_dir in case_dirs:
        case_id = case_dir.name
        try:
            label_file = None
            if options.labels is not None:
                label_file = _label_file(options.labels, case_id)
            case = import_case(case_dir, options, label_file, label_set)
            output.write_case(
                out, kind, case_id, case.images, case.affine, case.label, case.manifest
            )
        except DatasetError as err:  # reported once, by the caller, with the other refusals
            report.refused.append(str(err))
            continue
        report.imported.append(case_id)
        report.b_values[case_id] = case.manifest["dwi"]["b_value_used"]
        log.info("case %s imported (%s)", case_id, ", ".join(options.channels))
    if kind == output.DATASET and out.exists():
        report.cases_in_out = output.write_dataset_json(
            out, options.channels, label_set, report.b_values, ignore_value_of(label_set)
        )
    return report
