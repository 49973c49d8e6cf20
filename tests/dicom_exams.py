"""Synthetic scanner exams: a phantom case written as the DICOM a WB-MRI scanner exports.

Import as ``from tests.dicom_exams import ExamSpec, write_dicom_exam``. Written with pydicom and
numpy only (nothing of ``sap_lightning.scanner``), so the import is checked against an
independent writer:

* classic MR Image Storage, one frame per file, explicit VR little endian; one SeriesInstanceUID
  per station and contrast, a shared StudyInstanceUID and FrameOfReferenceUID;
* ImagePositionPatient = centre of the first voxel in LPS, ImageOrientationPatient = row then
  column cosines, PixelSpacing = [between rows, between columns], SliceThickness and
  SpacingBetweenSlices; values stored as uint16 with a RescaleSlope per file;
* T1 stations on the phantom's own voxel lattice (axial, or coronal slices), overlapping, each
  with its own gain; DWI at half the in-plane resolution with thicker slices, b50 and b1000 in
  one series per station, b50 made from b1000 and a known ADC map (S_b = S_0 exp(-b ADC)) inside
  the body, the same noise at every b-value outside it;
* file names random, folders nested, InstanceNumber reversed, notes and hidden files beside;
* on request: vendor b-value tags, Philips-like derived frames appended to the DWI, an older
  repeat of a station, a missing slice, a duplicated slice, patient motion before the DWI, a
  second non-DWI contrast at every station.

Geometry is defined in the phantom's voxel index space: voxel (column c, row r, slice s) of a
station is phantom index ``p0 + c u + r v + s w``; world (LPS) positions follow from the
phantom's affine.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VENDORS = ("standard", "siemens", "ge", "philips")
MANUFACTURER = {
    "standard": "Generic",
    "siemens": "SIEMENS",
    "ge": "GE MEDICAL SYSTEMS",
    "philips": "Philips Medical Systems",
}
ADC_UNIT = 1e-3
"""The known ADC map is in 10^-3 mm^2/s."""


def known_adc(lps: np.ndarray) -> np.ndarray:
    """The exam's ADC (10^-3 mm^2/s) at LPS points (..., 3): linear in world position, so any
    linear interpolation of it is exact; 0.75-1.45 over the phantom's field of view."""
    lps = np.asarray(lps, np.float64)
    return 1.1 + 0.3 * (lps[..., 2] - 576.0) / 576.0 - 0.05 * (lps[..., 0] + 144.0) / 144.0


def known_adc_on_grid(affine_ras: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """:func:`known_adc` at the voxel centres of a NIfTI grid (x, y, z array order)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    ras = index @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    return known_adc(ras * np.array([-1.0, -1.0, 1.0]))


@dataclass
class ExamSpec:
    """What to write; the defaults are a clean 5-station axial exam with standard tags."""

    orientation: str = "axial"
    vendor: str = "standard"
    stations: int = 5
    overlap: int = 8
    """T1 slices (axial) or rows (coronal) shared by neighbouring stations."""
    gains_seed: int = 0
    b_values: tuple[float, ...] = (50.0, 1000.0)
    derived_frames: bool = False
    repeated_station: int | None = None
    """Also write an older acquisition of this T1 station (same description, wrong content)."""
    missing_slice: tuple[int, int] | None = None
    """(T1 station, slice) not written."""
    duplicate_slice: tuple[int, int] | None = None
    """(T1 station, slice) written twice."""
    dwi_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Patient movement between T1 and DWI (LPS mm): DWI content moves by minus this."""
    other_contrast: bool = False
    """Also write a "STIR station k" series (no b-value) at every T1 station."""
    missing_dwi_station: int | None = None
    """This DWI station (0-based, feet first) is not written: no DWI covers its part of the T1."""


@dataclass
class WrittenExam:
    folder: Path
    t1_gains: list[float]
    dwi_gains: list[float]
    station_ranges: list[tuple[int, int]]
    """Phantom axis-2 index range [first, last] of each T1 station, feet first."""
    series: dict[str, list[Path]] = field(default_factory=dict)
    """SeriesDescription -> files written."""


@dataclass(frozen=True)
class _Grid:
    p0: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    size: tuple[int, int, int]
    """(columns, rows, slices)."""


def _gains(rng: np.random.Generator, n: int) -> list[float]:
    while True:
        gains = rng.uniform(0.7, 1.3, n)
        if gains.max() / gains.min() > 1.2:
            return [float(g) for g in gains]


def _station_ranges(n_z: int, stations: int, overlap: int) -> list[tuple[int, int]]:
    length = -(-(n_z + (stations - 1) * overlap) // stations)
    starts = [round(k * (n_z - length) / (stations - 1)) for k in range(stations)]
    return [(s, s + length - 1) for s in starts]


def _grids(shape, ranges, orientation: str, dwi: bool) -> list[_Grid]:
    """Station grids in phantom index space (feet first)."""
    nx, ny, _ = shape
    grids = []
    for z_first, z_last in ranges:
        if orientation == "axial":
            if dwi:
                step = 1.5
                grids.append(
                    _Grid(
                        np.array([nx - 1.5, ny - 1.5, z_first]),
                        np.array([-2.0, 0, 0]),
                        np.array([0, -2.0, 0]),
                        np.array([0, 0, step]),
                        (nx // 2, ny // 2, int((z_last - z_first) // step) + 1),
                    )
                )
            else:
                grids.append(
                    _Grid(
                        np.array([nx - 1.0, ny - 1.0, z_first]),
                        np.array([-1.0, 0, 0]),
                        np.array([0, -1.0, 0]),
                        np.array([0, 0, 1.0]),
                        (nx, ny, z_last - z_first + 1),
                    )
                )
        elif dwi:
            step = 1.5
            grids.append(
                _Grid(
                    np.array([nx - 1.5, ny - 1.0, z_last - 0.5]),
                    np.array([-2.0, 0, 0]),
                    np.array([0, 0, -2.0]),
                    np.array([0, -step, 0]),
                    (nx // 2, (z_last - z_first + 1) // 2, int((ny - 1) // step) + 1),
                )
            )
        else:
            grids.append(
                _Grid(
                    np.array([nx - 1.0, ny - 1.0, z_last]),
                    np.array([-1.0, 0, 0]),
                    np.array([0, 0, -1.0]),
                    np.array([0, -1.0, 0]),
                    (nx, z_last - z_first + 1, ny),
                )
            )
    return grids


def _sample(volume: np.ndarray, grid: _Grid, shift_index: np.ndarray | None = None) -> np.ndarray:
    """``volume`` at the grid's voxels, (slices, rows, columns); 0 outside."""
    c, r, s = (np.arange(n, dtype=np.float64) for n in grid.size)
    points = (
        grid.p0[:, None, None, None]
        + grid.u[:, None, None, None] * c[None, None, None, :]
        + grid.v[:, None, None, None] * r[None, None, :, None]
        + grid.w[:, None, None, None] * s[None, :, None, None]
    )
    if shift_index is not None:
        points = points + shift_index[:, None, None, None]
    return ndimage.map_coordinates(volume, points, order=1, mode="constant", cval=0.0)


def _world(affine_lps: np.ndarray, index: np.ndarray) -> np.ndarray:
    return affine_lps[:3, :3] @ index + affine_lps[:3, 3]


class _Writer:
    """Writes the files of one exam: shared UIDs, random names, reversed instance numbers."""

    def __init__(self, folder: Path, spec: ExamSpec, affine_lps: np.ndarray, seed: int) -> None:
        self.folder, self.spec, self.affine_lps = folder, spec, affine_lps
        self.rng = np.random.default_rng(seed)
        self.study = generate_uid()
        self.frame = generate_uid()
        self.number = 0
        self.written: dict[str, list[Path]] = {}
        self.subfolders = [folder / secrets.token_hex(3) / secrets.token_hex(2) for _ in range(3)]

    def _path(self) -> Path:
        sub = self.subfolders[int(self.rng.integers(len(self.subfolders)))]
        suffix = ".dcm" if self.rng.random() < 0.5 else ""
        return sub / f"{secrets.token_hex(8)}{suffix}"

    def _geometry(self, ds: Dataset, grid: _Grid, s: float) -> None:
        axes = [self.affine_lps[:3, :3] @ a for a in (grid.u, grid.v, grid.w)]
        spacing = [float(np.linalg.norm(a)) for a in axes]
        row, column, normal = (a / n for a, n in zip(axes, spacing))
        assert np.allclose(np.cross(row, column), normal), "slice axis must follow the normal"
        position = _world(self.affine_lps, grid.p0 + s * grid.w)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"

    def _b_value(self, ds: Dataset, b: float) -> None:
        vendor = self.spec.vendor
        if vendor == "standard":
            ds.DiffusionBValue = float(b)
        elif vendor == "siemens":
            ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(
                0x0C, "IS", str(int(b))
            )
        elif vendor == "ge":
            ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
                0x39, "IS", [1_000_000_000 + int(b), 8, 0, 0]
            )
        else:
            ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
                0x03, "FL", float(b)
            )

    def series(
        self,
        description: str,
        grid: _Grid,
        frames: list[tuple[float | None, np.ndarray, tuple[str, ...], str | None]],
        time: str,
        skip: int | None = None,
        twice: int | None = None,
    ) -> None:
        """One series: ``frames`` = (b-value, volume (slices, rows, columns), ImageType,
        DiffusionDirectionality) written slice by slice."""
        self.number += 1
        uid = generate_uid()
        total = sum(volume.shape[0] for _, volume, _, _ in frames)
        instance = total + (1 if twice is not None else 0)
        files = self.written.setdefault(description, [])
        for b, volume, image_type, directionality in frames:
            for s in range(volume.shape[0]):
                if s == skip:
                    continue
                for _ in range(2 if s == twice else 1):
                    ds = self._dataset(uid, description, time, instance)
                    self._geometry(ds, grid, float(s))
                    ds.ImageType = list(image_type)
                    if b is not None:
                        self._b_value(ds, b)
                    if directionality:
                        ds.DiffusionDirectionality = directionality
                    self._pixels(ds, volume[s])
                    path = self._path()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    ds.save_as(path, enforce_file_format=True)
                    files.append(path)
                    instance -= 1

    def _dataset(self, uid: str, description: str, time: str, instance: int) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = self.study
        ds.SeriesInstanceUID = uid
        ds.FrameOfReferenceUID = self.frame
        ds.Modality = "MR"
        ds.Manufacturer = MANUFACTURER[self.spec.vendor]
        ds.PatientID = "PHANTOM"
        ds.SeriesDescription = description
        ds.SeriesNumber = self.number
        ds.SeriesDate = ds.AcquisitionDate = "20260102"
        ds.SeriesTime = ds.AcquisitionTime = time
        ds.InstanceNumber = instance
        return ds

    @staticmethod
    def _pixels(ds: Dataset, values: np.ndarray) -> None:
        top = float(values.max())
        slope = float(f"{max(top, 1e-3) / 60000.0:.8g}")
        stored = np.clip(np.rint(values / slope), 0, 65535).astype(np.uint16)
        set_pixel_data(ds, stored, "MONOCHROME2", 16)
        ds.RescaleSlope = f"{slope:.8g}"
        ds.RescaleIntercept = "0"


def write_dicom_exam(
    folder: str | Path,
    t1: np.ndarray,
    b1000: np.ndarray,
    affine_ras: np.ndarray,
    spec: ExamSpec | None = None,
    seed: int = 0,
    body: np.ndarray | None = None,
) -> WrittenExam:
    """Write ``folder`` (a case folder) as a scanner exam of the phantom images ``t1`` and
    ``b1000`` ((x, y, z) arrays on the RAS grid ``affine_ras``).

    ``body`` (a mask on that grid) limits diffusion to the body: outside it every b-value holds
    the same noise floor, as on a scanner, instead of noise amplified by exp(-b ADC)."""
    spec = spec or ExamSpec()
    folder = Path(folder)
    affine_lps = LPS_FROM_RAS @ np.asarray(affine_ras, np.float64)
    rng = np.random.default_rng(spec.gains_seed)
    t1_gains, dwi_gains = _gains(rng, spec.stations), _gains(rng, spec.stations)
    ranges = _station_ranges(t1.shape[2], spec.stations, spec.overlap)
    writer = _Writer(folder, spec, affine_lps, seed)
    t1_grids = _grids(t1.shape, ranges, spec.orientation, dwi=False)
    dwi_grids = _grids(t1.shape, ranges, spec.orientation, dwi=True)
    # A DWI voxel averages the phantom over its footprint: a symmetric (Gaussian) stand-in for
    # the box of 2 x 2 x 1.5 phantom voxels, so the blur moves no centroid.
    footprint = [np.linalg.norm(a) for a in (dwi_grids[0].u, dwi_grids[0].v, dwi_grids[0].w)]
    axes = [int(np.argmax(np.abs(a))) for a in (dwi_grids[0].u, dwi_grids[0].v, dwi_grids[0].w)]
    sigma = [0.0, 0.0, 0.0]
    for axis, width in zip(axes, footprint):
        sigma[axis] = float(np.sqrt(max(width**2 - 1.0, 0.0) / 12.0))
    smooth = ndimage.gaussian_filter(b1000.astype(np.float64), sigma)
    shift = np.linalg.solve(affine_lps[:3, :3], np.asarray(spec.dwi_shift_mm, np.float64))

    hour = 10
    for k, grid in enumerate(t1_grids):
        if spec.repeated_station == k:
            moved = grid.p0 + np.array([4.0, 0, 0])  # the patient lay elsewhere then
            older = _Grid(moved, grid.u, grid.v, grid.w, grid.size)
            volume = _sample(t1.astype(np.float64), older) * t1_gains[k]
            writer.series(f"T1 station {k + 1}", grid, [(None, volume, _T1_TYPE, None)], "090000")
        volume = _sample(t1.astype(np.float64), grid) * t1_gains[k]
        skip = spec.missing_slice[1] if spec.missing_slice and spec.missing_slice[0] == k else None
        twice = (
            spec.duplicate_slice[1]
            if spec.duplicate_slice and spec.duplicate_slice[0] == k
            else None
        )
        writer.series(
            f"T1 station {k + 1}",
            grid,
            [(None, volume, _T1_TYPE, None)],
            f"{hour:02d}{k:02d}00",
            skip=skip,
            twice=twice,
        )
        if spec.other_contrast:
            stir = volume.max() - volume
            writer.series(f"STIR station {k + 1}", grid, [(None, stir, _T1_TYPE, None)], "120000")
    dwi_type = _SIEMENS_TRACE if spec.vendor == "siemens" else _DWI_TYPE
    for k, grid in enumerate(dwi_grids):
        if k == spec.missing_dwi_station:
            continue
        b_high = _sample(smooth, grid, shift) * dwi_gains[k]
        points = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.size[::-1]], indexing="ij"),
            axis=-1,
        )  # (slice, row, column, 3) as (s, r, c)
        index = grid.p0 + points[..., 2:3] * grid.u + points[..., 1:2] * grid.v
        index = index + points[..., 0:1] * grid.w
        adc = known_adc(index @ affine_lps[:3, :3].T + affine_lps[:3, 3]) * ADC_UNIT
        if body is not None:  # partial volume at the body's border
            adc = adc * _sample(body.astype(np.float64), grid, shift)
        frames = [(b, b_high * np.exp((1000.0 - b) * adc), dwi_type, None) for b in spec.b_values]
        if spec.derived_frames:
            frames.append((max(spec.b_values), adc / ADC_UNIT * 500.0, _DERIVED, "ISOTROPIC"))
        writer.series(f"DWI station {k + 1}", grid, frames, f"{hour + 1:02d}{k:02d}00")
    _junk(folder)
    return WrittenExam(folder, t1_gains, dwi_gains, ranges, writer.written)


_T1_TYPE = ("ORIGINAL", "PRIMARY", "M", "ND")
_DWI_TYPE = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")
_SIEMENS_TRACE = ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND")
_DERIVED = ("DERIVED", "PRIMARY", "DIFFUSION", "ISOTROPIC")


def _junk(folder: Path) -> None:
    """What exports carry besides images: notes, a viewer's settings, hidden files."""
    (folder / "README.txt").write_text("Exported from the scanner console.\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "viewer").mkdir(exist_ok=True)
    (folder / "viewer" / "settings.ini").write_text("[viewer]\nzoom=1\n")
