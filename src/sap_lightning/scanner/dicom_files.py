"""Finding an exam's DICOM files and reading what the import needs from their headers.

Scanner exports and PACS downloads put files anywhere under a case folder, with any names
(``IM0001``, hashed names, no extension) next to ``DICOMDIR``, notes and viewer software. Every
file is probed for the DICOM "DICM" prefix; the others are skipped and counted. Only headers are
read here (pixels are read later, for the slices actually used), and each header is reduced to a
:class:`SliceHeader` holding what later steps decide on: series, geometry, time, b-value,
image type.

b-values live in the standard DiffusionBValue (0018,9087) or, on older software and many
exports, only in vendor tags: Siemens (0019,100C), GE (0043,1039) whose first value carries
10^9 on top of the b-value, Philips (2001,1003). Private tags are looked up through their
private creator (the block number varies between exports), with the usual block as a fallback;
an anonymiser may have removed them all, and then a diffusion series no longer says it is one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from sap_lightning.core.errors import DatasetError

GEOMETRY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
}
"""Classes whose files must carry a full image header: a file of such a class without one is
broken (a copy cut short loses its end silently: pydicom then returns what it read)."""
MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}

VENDOR_B_VALUE_TAGS: tuple[tuple[str, int, str, int], ...] = (
    ("Siemens", 0x0019, "SIEMENS MR HEADER", 0x0C),
    ("GE", 0x0043, "GEMS_PARM_01", 0x39),
    ("Philips", 0x2001, "Philips Imaging DD 001", 0x03),
)
"""(vendor, group, private creator, element offset): Siemens (0019,100C), GE (0043,1039),
Philips (2001,1003) in their usual block 0x10."""
GE_B_VALUE_MODULUS = 1_000_000_000
"""GE stores b + 10^9 (or a multiple) in the first value of (0043,1039): 1000000750 is b=750."""


@dataclass(frozen=True)
class SliceHeader:
    """One image file (one frame) as the import sees it; positions and cosines in LPS mm."""

    path: Path
    series_uid: str
    series_description: str
    series_number: int | None
    series_time: str
    """SeriesDate + SeriesTime (else the acquisition's), normalised so later sorts later."""
    instance_number: int | None
    position: tuple[float, float, float]
    """ImagePositionPatient: the centre of the first transmitted voxel."""
    row_cosine: tuple[float, float, float]
    """Direction of increasing column index (along a row), ImageOrientationPatient[0:3]."""
    column_cosine: tuple[float, float, float]
    """Direction of increasing row index, ImageOrientationPatient[3:6]."""
    pixel_spacing: tuple[float, float]
    """PixelSpacing as stored: (between rows, between columns)."""
    rows: int
    columns: int
    slice_thickness: float | None
    image_type: tuple[str, ...]
    b_value: float | None
    b_value_tag: str | None
    """Where the b-value was read: ``(0018,9087)``, ``Siemens (0019,100C)``, ..."""
    diffusion_directionality: str | None
    frame_of_reference: str
    manufacturer: str

    @property
    def normal(self) -> np.ndarray:
        """Slice normal: row cosine x column cosine (the direction slices are sorted along)."""
        return np.cross(np.asarray(self.row_cosine), np.asarray(self.column_cosine))

    def where(self, root: Path) -> str:
        """The file relative to ``root`` (the case folder's parent), for messages."""
        try:
            return str(self.path.relative_to(root))
        except ValueError:
            return str(self.path)


@dataclass
class CaseScan:
    """Every image file of one case, and what was passed over."""

    case_id: str
    folder: Path
    slices: list[SliceHeader]
    not_dicom: int
    """Files without the DICM prefix (notes, viewers, DICOMDIR-less raw files)."""
    not_images: dict[str, int]
    """DICOM files that are no image slice (DICOMDIR, reports, screenshots), by reason."""


def _time_key(date: Any, time: Any) -> str:
    """``YYYYMMDDHHMMSS.ffffff`` from DA and TM values (TM may be ``HHMM`` or carry a fraction),
    so string order is time order; empty when the time is missing."""
    date, time = str(date or "").strip(), str(time or "").strip()
    if not time:
        return ""
    whole, _, fraction = time.partition(".")
    return f"{date:0<8}{whole:0<6}.{fraction:0<6}"


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def _number(value: Any, kind: type) -> Any:
    try:
        return kind(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _private_value(ds: Dataset, group: int, creator: str, offset: int) -> tuple[Any, int]:
    """A private element's value and tag, found through its creator; the usual block 0x10 when
    the creator is gone. ``(None, 0)`` when absent."""
    try:
        element = ds.private_block(group, creator)[offset]
        return element.value, int(element.tag)
    except KeyError:
        tag = (group << 16) | (0x1000 + offset)
        return (ds[tag].value, tag) if tag in ds else (None, 0)


def _first_number(value: Any, vr_hint: str) -> float | None:
    """The first number of an IS/DS/FL value, also from raw bytes (implicit VR exports keep
    private elements as UN)."""
    if isinstance(value, bytes):
        if vr_hint == "FL" and len(value) >= 4:
            return float(struct.unpack("<f", value[:4])[0])
        value = value.decode("ascii", errors="ignore").strip("\x00 ").split("\\")
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    number = _number(value, float)
    return number if number is not None and np.isfinite(number) else None


def read_b_value(ds: Dataset) -> tuple[float | None, str | None]:
    """The b-value (s/mm^2) of a frame and the tag it came from; ``(None, None)`` without one.

    The standard (0018,9087) wins; then Siemens, GE (first value modulo 10^9) and Philips,
    whatever the Manufacturer says (anonymisers blank it more often than the private blocks).
    """
    standard = ds.get("DiffusionBValue")
    number = _first_number(standard, "FD") if standard is not None else None
    if number is not None:
        return number, "(0018,9087)"
    for vendor, group, creator, offset in VENDOR_B_VALUE_TAGS:
        raw, tag = _private_value(ds, group, creator, offset)
        if raw is None:
            continue
        number = _first_number(raw, "FL" if vendor == "Philips" else "IS")
        if number is None:
            continue
        if vendor == "GE":
            number = float(round(number) % GE_B_VALUE_MODULUS)
        return number, f"{vendor} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return None, None


def _header(path: Path, ds: Dataset, case_id: str, root: Path) -> SliceHeader | str:
    """The slice header of ``ds``, or why it is not an image slice; broken files raise."""
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    where = f"case {case_id}: {path.relative_to(root)}"
    if sop_class in MULTIFRAME_SOP_CLASSES or int(ds.get("NumberOfFrames") or 1) > 1:
        raise DatasetError(
            f"{where}: multi-frame DICOM ({MULTIFRAME_SOP_CLASSES.get(sop_class, sop_class)}) "
            "is not read: export the series as classic single-frame images"
        )
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    rows, columns = _number(ds.get("Rows"), int), _number(ds.get("Columns"), int)
    complete = None not in (position, orientation, spacing, rows, columns)
    uid = str(ds.get("SeriesInstanceUID") or "")
    if not complete or not uid:
        if sop_class in GEOMETRY_SOP_CLASSES:
            raise DatasetError(
                f"{where}: incomplete {GEOMETRY_SOP_CLASSES[sop_class]} header (no series, "
                "position, orientation, spacing or size): the file is cut short or damaged"
            )
        return "no image geometry" if sop_class else "no SOP class"
    assert position is not None and orientation is not None and spacing is not None
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(column) - 1) > 1e-3
        or abs(float(row @ column)) > 1e-3
        or min(spacing) <= 0
    ):
        raise DatasetError(
            f"{where}: ImageOrientationPatient {list(orientation)} or PixelSpacing "
            f"{list(spacing)} is not a valid image plane"
        )
    b_value, b_tag = read_b_value(ds)
    return SliceHeader(
        path=path,
        series_uid=uid,
        series_description=str(ds.get("SeriesDescription") or "").strip(),
        series_number=_number(ds.get("SeriesNumber"), int),
        series_time=_time_key(ds.get("SeriesDate"), ds.get("SeriesTime"))
        or _time_key(ds.get("AcquisitionDate"), ds.get("AcquisitionTime")),
        instance_number=_number(ds.get("InstanceNumber"), int),
        position=(position[0], position[1], position[2]),
        row_cosine=(orientation[0], orientation[1], orientation[2]),
        column_cosine=(orientation[3], orientation[4], orientation[5]),
        pixel_spacing=(spacing[0], spacing[1]),
        rows=int(rows),  # type: ignore[arg-type]
        columns=int(columns),  # type: ignore[arg-type]
        slice_thickness=_number(ds.get("SliceThickness"), float),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        b_value=b_value,
        b_value_tag=b_tag,
        diffusion_directionality=(str(ds.get("DiffusionDirectionality") or "").upper() or None),
        frame_of_reference=str(ds.get("FrameOfReferenceUID") or ""),
        manufacturer=str(ds.get("Manufacturer") or ""),
    )


def scan_case(case_dir: str | os.PathLike) -> CaseScan:
    """Read the header of every DICOM file under ``case_dir`` (any names, any nesting).

    Files are visited in sorted path order; names never decide anything later. A DICOM file that
    cannot be parsed, or an MR image whose header is incomplete, stops the case naming the file.
    """
    case_dir = Path(case_dir)
    case_id, root = case_dir.name, case_dir.parent
    slices: list[SliceHeader] = []
    not_dicom, not_images = 0, {}
    paths = sorted(
        Path(folder) / name
        for folder, dirs, names in os.walk(case_dir)
        for name in names
        if not name.startswith(".")
    )
    for path in paths:
        if not path.is_file() or not is_dicom(path):
            not_dicom += 1
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as err:
            raise DatasetError(
                f"case {case_id}: {path.relative_to(root)}: unreadable DICOM header "
                f"({type(err).__name__}: {err})"
            ) from err
        found = _header(path, ds, case_id, root)
        if isinstance(found, str):
            not_images[found] = not_images.get(found, 0) + 1
        else:
            slices.append(found)
    if not slices:
        raise DatasetError(
            f"case {case_id}: {case_dir}: no DICOM image files ({not_dicom} other files)"
        )
    return CaseScan(case_id, case_dir, slices, not_dicom, not_images)
