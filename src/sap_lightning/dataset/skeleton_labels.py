"""Stage-1 skeleton labels from the output of public MRI segmenters (``sap skeleton-labels``).

Each tool's published label table (``segmenter_tables.py``) is mapped, by name, onto the
library's nine skeletal regions (``layout.SKELETON_LABELS``): cervical C1-C7, thoracic T1-T12,
lumbar L1-L5, pelvis = both hips + sacrum, femurs, humeri, scapulae, clavicles, sternum. Every
other structure (organs, muscles, ribs, discs, spinal cord) becomes background, as in the paper.

A tool that segments the spine as one structure (``total_mr``'s ``vertebrae``, MRSegmentator's
``spine``, TotalVibeSegmentator's vertebral body / posterior elements) cannot say which level a
vertebra is: those voxels stay background and the three spine regions are reported missing,
unless a second source with levels (TotalSegmentator ``vertebrae_mr``) is given. Several sources
per case are merged in the order given; where two sources both name a skeletal region, the
later one wins.

Inputs (decided here, documented in the README):

- images: ``IMAGES/<case>_0000<ending>`` (T1) and ``IMAGES/<case>_0001<ending>`` (b1000 on the
  T1 grid), the nnU-Net naming; case ids come from the T1 files;
- label maps, one per case and source: ``LABELS/<case><ending>``, also found as
  ``<case>_0000<ending>`` and with MRSegmentator's ``_seg`` postfix; or a folder
  ``LABELS/<case>/`` of binary masks ``<structure name><ending>`` (TotalSegmentator without
  ``--ml``). Each map must lie on the T1 grid, in any voxel order (it is reoriented to the T1's
  order; no resampling).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations

from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import atomic_dir, atomic_path, write_json
from sap_lightning.dataset import layout
from sap_lightning.dataset.file_checks import AFFINE_TOLERANCE_MM
from sap_lightning.dataset.images import IMAGE_FILE_ENDINGS, image_file_ending, read_image
from sap_lightning.dataset.segmenter_tables import TABLES
from sap_lightning.dataset.validate import check_dataset

TOOLS: tuple[str, ...] = tuple(TABLES)
"""Segmenters whose label maps are understood: ``total_mr``, ``vertebrae_mr``, ``totalvibeseg``,
``mrsegmentator``."""

REGION_PARTS: dict[str, tuple[str, ...]] = {
    "cervical_spine": tuple(f"C{i}" for i in range(1, 8)),
    "thoracic_spine": tuple(f"T{i}" for i in range(1, 13)),
    "lumbar_spine": tuple(f"L{i}" for i in range(1, 6)),
    "pelvis": ("hip_left", "hip_right", "sacrum"),
    "femurs": ("femur_left", "femur_right"),
    "humeri": ("humerus_left", "humerus_right"),
    "scapulae": ("scapula_left", "scapula_right"),
    "clavicles": ("clavicle_left", "clavicle_right"),
    "sternum": ("sternum",),
}
"""Each skeletal region and the bones it is made of (canonical part names)."""

UNLEVELLED_SPINE: frozenset[str] = frozenset(
    {"vertebrae", "spine", "vertebra_body", "vertebra_posterior_elements"}
)
"""Tool names for the whole spine without levels: left background (see the module doc)."""

_PART_REGION = {part: region for region, parts in REGION_PARTS.items() for part in parts}
_SIDE_WORDS = {"left", "right"}
_BONE_ALIASES = {"clavicula": "clavicle", "femur": "femur", "hip": "hip", "humerus": "humerus"}


def canonical_part(name: str) -> str | None:
    """The skeletal part a tool's structure name denotes (``vertebrae_C3`` -> ``C3``,
    ``left_hip`` / ``hip_left`` -> ``hip_left``, ``clavicula_right`` -> ``clavicle_right``), or
    ``None`` for anything that is not one of the regions' bones."""
    if name.startswith("vertebrae_") and name[len("vertebrae_") :] in _PART_REGION:
        return name[len("vertebrae_") :]
    words = name.split("_")
    if len(words) == 2 and _SIDE_WORDS & set(words):
        side = words[0] if words[0] in _SIDE_WORDS else words[1]
        bone = words[1] if words[0] in _SIDE_WORDS else words[0]
        part = f"{_BONE_ALIASES.get(bone, bone)}_{side}"
        return part if part in _PART_REGION else None
    return name if name in _PART_REGION else None


@dataclass(frozen=True)
class ToolMapping:
    """One tool's label table reduced to what the skeleton needs."""

    tool: str
    source: dict[str, str]
    region_of_id: dict[int, int]
    """Tool label id -> skeleton label value (only the ids that become a region)."""
    parts: frozenset[str]
    """Canonical skeletal parts the tool segments."""
    names: dict[int, str]
    """The whole table: id -> structure name."""
    unlevelled_spine: tuple[str, ...]


def tool_mapping(tool: str) -> ToolMapping:
    """The mapping of ``tool``'s published label ids onto the skeleton regions."""
    if tool not in TABLES:
        raise DatasetError(f"unknown segmenter {tool!r}; known: {', '.join(TOOLS)}")
    table = TABLES[tool]
    names: dict[int, str] = dict(table["labels"])
    region_of_id: dict[int, int] = {}
    parts: set[str] = set()
    for label_id, name in names.items():
        part = canonical_part(name)
        if part is not None:
            parts.add(part)
            region_of_id[label_id] = layout.SKELETON_LABELS[_PART_REGION[part]]
    unlevelled = tuple(sorted(n for n in names.values() if n in UNLEVELLED_SPINE))
    return ToolMapping(
        tool, dict(table["source"]), region_of_id, frozenset(parts), names, unlevelled
    )


def coverage(parts: set[str] | frozenset[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(regions missing, {region: parts missing})`` for a set of segmented parts: a region is
    missing when none of its bones is segmented, partial when only some are."""
    missing, partial = [], {}
    for region, region_parts in REGION_PARTS.items():
        absent = [p for p in region_parts if p not in parts]
        if len(absent) == len(region_parts):
            missing.append(region)
        elif absent:
            partial[region] = absent
    return missing, partial


def map_label_array(array: np.ndarray, mapping: ToolMapping) -> np.ndarray:
    """Skeleton labels (uint8) of one tool's integer label map (a lookup table over its ids)."""
    lut = np.zeros(max(mapping.names) + 1, dtype=np.uint8)
    for label_id, value in mapping.region_of_id.items():
        lut[label_id] = value
    return lut[array]


# --------------------------------------------------------------------------- files


def _strip_ending(name: str) -> tuple[str, str] | None:
    ending = image_file_ending(name)
    return (name[: -len(ending)], ending) if ending else None


def _image_cases(images: Path) -> dict[str, dict[int, Path]]:
    """``{case: {channel: path}}`` from ``<case>_<XXXX><ending>`` files."""
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        stripped = _strip_ending(path.name)
        if path.name.startswith(".") or not path.is_file() or stripped is None:
            continue
        stem = stripped[0]
        case, sep, channel = stem.rpartition("_")
        if sep and len(channel) == 4 and channel.isdigit():
            cases.setdefault(case, {})[int(channel)] = path
    return cases


def _label_candidates(case: str) -> list[str]:
    return [case, f"{case}_0000", f"{case}_seg", f"{case}_0000_seg"]


def _find_label(labels: Path, case: str, image_files: set[Path]) -> tuple[Path | None, list[Path]]:
    """The label map (file or mask folder) of ``case`` and every candidate that exists; the
    images themselves never count (MRSegmentator writes ``<case>_0000_seg`` next to them)."""
    found = []
    for stem in _label_candidates(case):
        if (labels / stem).is_dir():
            found.append(labels / stem)
        for ending in IMAGE_FILE_ENDINGS:
            path = labels / f"{stem}{ending}"
            if path.is_file() and path.resolve() not in image_files:
                found.append(path)
    return (found[0] if len(found) == 1 else None), found


@dataclass(frozen=True)
class _Source:
    mapping: ToolMapping
    folder: Path


def _read_map(path: Path, mapping: ToolMapping, case: str) -> tuple[np.ndarray, np.ndarray]:
    """``(skeleton labels, affine)`` of one case's label map (file or mask folder)."""
    where = f"case {case}: {path}"
    if path.is_dir():
        return _read_mask_folder(path, mapping, case)
    try:
        image = read_image(path)
    except Exception as err:  # nibabel, SimpleITK and gzip raise many types on corrupt files
        raise DatasetError(f"{where}: unreadable label map ({err})") from err
    data = np.asarray(image.data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{where}: label map is not 3D (shape {tuple(data.shape)})")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DatasetError(f"{where}: label map holds non-integer values")
        data = data.astype(np.int64)
    low, high = int(data.min()), int(data.max())
    unknown = sorted(set(np.unique(data).tolist()) - set(mapping.names) - {0})
    if low < 0 or unknown:
        shown = ", ".join(str(v) for v in unknown[:5]) if unknown else str(low)
        raise DatasetError(
            f"{where}: label values {shown} are not in {mapping.tool}'s table (ids 1-"
            f"{max(mapping.names)}, max here {high}): wrong --tool?"
        )
    return map_label_array(data, mapping), image.affine


def _read_mask_folder(
    folder: Path, mapping: ToolMapping, case: str
) -> tuple[np.ndarray, np.ndarray]:
    """TotalSegmentator's default output: one binary mask per structure, named after it."""
    id_of = {name: label_id for label_id, name in mapping.names.items()}
    masks = []
    for path in sorted(folder.iterdir()):
        stripped = _strip_ending(path.name)
        if stripped is None or path.name.startswith("."):
            continue
        if stripped[0] not in id_of:
            raise DatasetError(
                f"case {case}: {path}: {stripped[0]!r} is not a structure of {mapping.tool}"
            )
        masks.append((stripped[0], path))
    if not masks:
        raise DatasetError(f"case {case}: {folder}: no mask files <structure><ending>")
    out: np.ndarray | None = None
    affine: np.ndarray | None = None
    for name, path in masks:
        value = mapping.region_of_id.get(id_of[name], 0)
        try:
            image = read_image(path)
        except Exception as err:
            raise DatasetError(f"case {case}: {path}: unreadable mask ({err})") from err
        if out is None:
            out, affine = np.zeros(image.data.shape[:3], dtype=np.uint8), image.affine
        elif image.data.shape[:3] != out.shape or _differs(image.affine, affine):
            raise DatasetError(
                f"case {case}: {path}: mask grid differs from the case's other masks"
            )
        if value:
            out[np.asarray(image.data).reshape(out.shape) > 0] = value
    assert out is not None and affine is not None
    return out, affine


def _differs(affine: np.ndarray, reference: np.ndarray | None) -> bool:
    return reference is None or float(np.max(np.abs(affine - reference))) > AFFINE_TOLERANCE_MM


def _onto_grid(
    labels: np.ndarray, affine: np.ndarray, t1_shape: tuple[int, ...], t1_affine: np.ndarray
) -> np.ndarray | None:
    """``labels`` in the T1's voxel order when both describe the same grid (flips and axis
    permutations only), else ``None``."""
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(t1_affine)
    )
    moved = orientations.apply_orientation(labels, transform)
    moved_affine = affine @ orientations.inv_ornt_aff(transform, labels.shape)
    if moved.shape != tuple(t1_shape[:3]) or _differs(moved_affine, t1_affine):
        return None
    return np.ascontiguousarray(moved)


# --------------------------------------------------------------------------- command


@dataclass(frozen=True)
class SkeletonLabelsResult:
    root: Path
    cases: list[str]
    regions_missing: list[str]
    regions_partial: dict[str, list[str]]
    unlevelled_spine: list[str]
    cases_per_region: dict[str, int]
    """Cases in which each region has at least one voxel."""


def make_skeleton_dataset(
    sources: Sequence[tuple[str, str | os.PathLike]],
    images: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
) -> SkeletonLabelsResult:
    """Write a skeleton dataset (nnU-Net v2 raw) from segmenter label maps and the images.

    ``sources`` are ``(tool, label folder)`` pairs, merged in order (later wins on overlap).
    Every case's files are found and every problem reported before anything is written; the
    output folder appears complete, and passing ``check_dataset``, or not at all.
    """
    images, out = Path(images), Path(out)
    if not sources:
        raise DatasetError("skeleton-labels: give at least one --tool/--labels pair")
    resolved = [_Source(tool_mapping(tool), Path(folder)) for tool, folder in sources]
    for folder in [images, *(s.folder for s in resolved)]:
        if not folder.is_dir():
            raise DatasetError(f"skeleton-labels: {folder}: folder does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"skeleton-labels: {out}: output exists and is not empty")
    channels = len(layout.CHANNEL_NAMES)
    cases = _image_cases(images)
    if not cases:
        raise DatasetError(f"skeleton-labels: {images}: no images <case>_0000<ending>")
    image_files = {p.resolve() for files in cases.values() for p in files.values()}
    problems: list[str] = []
    plan: dict[str, list[Path]] = {}
    for case, files in cases.items():
        for channel in range(channels):
            if channel not in files:
                problems.append(
                    f"case {case}: {images / f'{case}_{channel:04d}.nii.gz'}: missing "
                    f"{layout.CHANNEL_NAMES[channel]} image"
                )
        for channel in sorted(set(files) - set(range(channels))):
            problems.append(f"case {case}: {files[channel]}: unexpected channel {channel:04d}")
        plan[case] = []
        for source in resolved:
            label, found = _find_label(source.folder, case, image_files)
            if label is None:
                what = (
                    "several label maps: " + ", ".join(p.name for p in found)
                    if found
                    else (f"missing {source.mapping.tool} label map {case}.nii.gz")
                )
                problems.append(f"case {case}: {source.folder / case}: {what}")
            else:
                plan[case].append(label)
    for source in resolved:
        known = {p.name for paths in plan.values() for p in paths}
        for path in sorted(source.folder.iterdir()):
            if path.name.startswith(".") or path.name in known or path.resolve() in image_files:
                continue
            if path.is_dir() or _strip_ending(path.name) is not None:
                problems.append(f"{path}: label map of no case in {images} (no T1 image)")
    if problems:
        raise DatasetError(
            f"skeleton-labels: {len(problems)} problems:\n  " + "\n  ".join(problems)
        )

    parts = frozenset().union(*(s.mapping.parts for s in resolved))
    missing, partial = coverage(parts)
    unlevelled = sorted(
        f"{s.mapping.tool}:{n}" for s in resolved for n in s.mapping.unlevelled_spine
    )
    present = dict.fromkeys(REGION_PARTS, 0)
    with atomic_dir(out) as tmp:
        for case, label_paths in plan.items():
            t1 = read_image(cases[case][0])
            t1_shape = tuple(int(s) for s in t1.data.shape[:3])
            merged = np.zeros(t1_shape, dtype=np.uint8)
            for source, path in zip(resolved, label_paths):
                mapped, affine = _read_map(path, source.mapping, case)
                on_grid = _onto_grid(mapped, affine, t1_shape, t1.affine)
                if on_grid is None:
                    raise DatasetError(
                        f"case {case}: {path}: label map grid (shape {mapped.shape}, "
                        f"{''.join(orientations.aff2axcodes(affine))}) is not the T1's "
                        f"(shape {t1_shape}); resample it to {cases[case][0].name} first"
                    )
                merged = np.where(on_grid > 0, on_grid, merged)
            for region, value in layout.SKELETON_LABELS.items():
                if value and np.any(merged == value):
                    present[region] += 1
            for channel in range(channels):
                _copy_image(cases[case][channel], layout.image_path(tmp, case, channel, ".nii.gz"))
            layout.save_nifti(layout.label_path(tmp, case, ".nii.gz"), merged, t1.affine)
        spec: dict[str, Any] = {
            "name": name or out.name,
            "channel_names": {str(i): c for i, c in enumerate(layout.CHANNEL_NAMES)},
            "labels": dict(layout.SKELETON_LABELS),
            "numTraining": len(plan),
            "file_ending": layout.FILE_ENDING,
            "regions_missing": missing,
            "regions_partial": partial,
            "label_sources": [
                {"tool": s.mapping.tool, "folder": str(s.folder), **s.mapping.source}
                for s in resolved
            ],
        }
        write_json(tmp / layout.DATASET_JSON, spec)
        check = check_dataset(tmp)
        if check:
            raise DatasetError(
                f"skeleton-labels: the dataset would not pass check-data: {check[0]}"
            )
    return SkeletonLabelsResult(out, list(plan), missing, partial, unlevelled, present)


def _copy_image(source: Path, target: Path) -> None:
    """``.nii.gz`` files are copied byte for byte; other formats converted (values, voxel order
    and RAS affine kept)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".nii.gz"):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    try:
        image = read_image(source)
    except Exception as err:
        raise DatasetError(f"{source}: unreadable image file ({err})") from err
    layout.save_nifti(target, np.asarray(image.data), image.affine)
