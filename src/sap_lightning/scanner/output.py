"""The import's output folder: an nnU-Net raw dataset (with labels) or a plain folder of
``<case>_XXXX.nii.gz`` files (what ``sap predict`` takes), plus ``manifests/<case>.json``.

A case is computed completely in memory before anything of it is written; its files are then
written under hidden temporary names (which every reader of the library skips) and renamed into
place, the manifest last. A refused case therefore leaves the folder as it was, and a case's
manifest exists only when all of its files do. Rerunning on the same OUT rewrites the same
files; a folder written with other channels or the other layout is refused before anything is
written, so one folder never mixes two imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import write_json
from sap_lightning.dataset import layout

MANIFESTS = "manifests"
DATASET = "dataset"
PLAIN = "plain"


def image_target(out: Path, kind: str, case_id: str, channel: int) -> Path:
    if kind == DATASET:
        return layout.image_path(out, case_id, channel, layout.FILE_ENDING)
    return out / f"{case_id}_{channel:04d}{layout.FILE_ENDING}"


def label_target(out: Path, case_id: str) -> Path:
    return layout.label_path(out, case_id, layout.FILE_ENDING)


def manifest_target(out: Path, case_id: str) -> Path:
    return out / MANIFESTS / f"{case_id}.json"


def _manifests(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((out / MANIFESTS).glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable manifest ({err})") from err
    return found


def check_out(out: Path, kind: str, channels: Sequence[str]) -> None:
    """Refuse an OUT that is not empty and not an earlier import with this layout and channels."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith(".")):
        return
    manifests = _manifests(out)
    if not manifests:
        raise DatasetError(
            f"{out}: not empty and not written by sap import-dicom (no {MANIFESTS}/); choose "
            "another folder"
        )
    for case_id, manifest in manifests.items():
        if manifest.get("layout") != kind or list(manifest.get("channels", [])) != list(channels):
            raise DatasetError(
                f"{out}: case {case_id} was imported as a {manifest.get('layout')} folder with "
                f"channels {manifest.get('channels')}; this import writes a {kind} folder with "
                f"channels {list(channels)}: choose another folder"
            )


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array, np.asarray(affine, np.float64))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    return image


@contextlib.contextmanager
def _staged(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Hidden temporary names for ``paths`` (same endings); renamed in order on success."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    temporary = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        ending = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        temporary.append(path.with_name(f".{path.name}.tmp-{tag}{ending}"))
    try:
        yield temporary
        for tmp, path in zip(temporary, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_case(
    out: Path,
    kind: str,
    case_id: str,
    images: Sequence[np.ndarray],
    affine: np.ndarray,
    label: np.ndarray | None,
    manifest: Mapping[str, Any],
) -> list[Path]:
    """Write one case's images (x, y, z arrays), label and manifest; returns the paths."""
    targets = [image_target(out, kind, case_id, c) for c in range(len(images))]
    volumes = list(images)
    if label is not None:
        targets.append(label_target(out, case_id))
        volumes.append(label)
    manifest_path = manifest_target(out, case_id)
    manifest = {**manifest, "outputs": [str(p.relative_to(out)) for p in targets]}
    with _staged([*targets, manifest_path]) as temporary:
        for volume, tmp in zip(volumes, temporary):
            nib.save(_nifti(volume, affine), tmp)
        temporary[-1].write_text(json.dumps(manifest, indent=2) + "\n")
    return [*targets, manifest_path]


def write_dataset_json(
    out: Path,
    channels: Sequence[str],
    labels: Mapping[str, int],
    b_values: Mapping[str, float],
    ignore_value: int,
) -> int:
    """dataset.json for every case imported into ``out`` so far; returns their number.

    The labels gain nnU-Net's ``ignore`` label (``ignore_value``) when a case's label has
    voxels no station covers (its manifest counts them)."""
    manifests = _manifests(out)
    cases = sorted(
        case_id
        for case_id, manifest in manifests.items()
        if all(Path(out, rel).is_file() for rel in manifest.get("outputs", []))
    )
    known = {case_id: manifests[case_id].get("dwi", {}).get("b_value_used") for case_id in cases}
    known.update({k: v for k, v in b_values.items() if k in known})
    labels = dict(labels)
    if any(manifests[c].get("label", {}).get("ignored_voxels", 0) for c in cases):
        labels[layout.IGNORE_LABEL] = ignore_value
    spec = {
        "name": out.name,
        "description": "Imported from scanner DICOM by sap import-dicom (manifests/<case>.json)",
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": layout.FILE_ENDING,
        "dwi_b_values": known,
    }
    write_json(out / layout.DATASET_JSON, spec)
    return len(cases)
