"""``sap predict``: whole-volume lesion (and optionally skeleton) prediction with a burden report.

Per case it writes, next to each other in the output folder (all atomically):
``<case>_prob.nii.gz`` (16-bit lesion probability, see
``layout.save_probability_nifti``), ``<case>.nii.gz`` (uint8 mask at the run's
tuned threshold), ``<case>_skeleton.nii.gz`` (with a skeleton model: 10-class map, each bone
component relabelled to its majority class), ``<case>_lesions.csv`` (lesion table) and
``<case>_summary.json`` (lesion count and volume overall and per skeletal region). The
probability and mask files are exactly what ``sap evaluate`` reads.

A dataset given as input is validated first (``require_valid_dataset``), so a broken file stops
the command before anything is written. A case's previous outputs are removed before its new
ones are written, summary first, and its summary is written last: after an interruption a case
never mixes files of two runs, and a case with a summary is complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sap_lightning.backbones import create_backbone, get_spec
from sap_lightning.backbones.transfer import read_checkpoint, transfer_weights
from sap_lightning.cache import prepare_image, resample_volume
from sap_lightning.core.errors import CheckpointError, DatasetError
from sap_lightning.core.io import atomic_path, write_json
from sap_lightning.core.run_layout import THRESHOLD_FILE, last_checkpoint_path, load_threshold
from sap_lightning.core.windows import DEFAULT_THRESHOLD, predict_volume, sliding_window_size
from sap_lightning.dataset import layout
from sap_lightning.dataset.validate import (
    CaseFiles,
    load_dataset,
    read_case_arrays,
    require_valid_dataset,
)
from sap_lightning.inference.burden import exam_summary, lesion_table, relabel_skeleton_by_component

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A network rebuilt from its checkpoint metadata, ready for inference."""

    net: nn.Module
    meta: dict[str, Any]
    roi_size: list[int]
    threshold: float | None
    """The run's tuned threshold (``threshold.json`` in the run folder), if any."""
    source: Path

    @property
    def task(self) -> str:
        return str(self.meta.get("task"))


def load_trained_model(path: str | os.PathLike, expected_task: str | None = None) -> TrainedModel:
    """Rebuild the network of a run folder, Lightning checkpoint or exported backbone.

    The architecture comes from the checkpoint's metadata, the weights are loaded strictly
    through :func:`sap_lightning.backbones.transfer.transfer_weights` (``weights_only=True``).
    """
    path = Path(path)
    threshold = None
    if path.is_dir():
        if (path / THRESHOLD_FILE).is_file():
            threshold = load_threshold(path / THRESHOLD_FILE)
        checkpoint_path = last_checkpoint_path(path)
        if not checkpoint_path.is_file():
            raise CheckpointError(f"{path}: run folder without {checkpoint_path.relative_to(path)}")
    else:
        checkpoint_path = path
    checkpoint = read_checkpoint(checkpoint_path)
    meta = checkpoint.meta
    if not meta or "backbone" not in meta:
        raise CheckpointError(
            f"{checkpoint_path}: no sap_lightning metadata: cannot tell which network to build "
            "(checkpoints written by sap pretrain/finetune and sap export carry it)"
        )
    if expected_task is not None and meta.get("task") != expected_task:
        raise CheckpointError(
            f"{checkpoint_path}: a {meta.get('task')!r} model where a {expected_task!r} model is "
            "expected"
        )
    net = create_backbone(
        meta["backbone"], meta["in_channels"], meta["out_channels"], **meta["backbone_kwargs"]
    )
    transfer_weights(net, checkpoint, mode="full")
    net.eval()
    multiple = get_spec(meta["backbone"]).input_multiple(meta["backbone_kwargs"])
    patch = meta.get("patch_size") or [multiple * 4] * 3
    window = sliding_window_size(patch, multiple, meta.get("roi_size"))
    return TrainedModel(net, dict(meta), window, threshold, path)


def iter_input_cases(
    input_path: str | os.PathLike, n_channels: int, validate: bool = True
) -> Iterator[CaseFiles]:
    """Cases of a dataset folder (``dataset.json``, validated unless ``validate=False`` for a
    caller that has just validated it; labels are optional) or of a plain folder of
    ``<case>_0000.nii.gz`` ... files (nnU-Net's ``imagesTs`` style)."""
    root = Path(input_path)
    if (root / layout.DATASET_JSON).is_file():
        info = require_valid_dataset(root, require_labels=False) if validate else load_dataset(root)
        yield from info.cases
        return
    if not root.is_dir():
        raise DatasetError(f"{root}: input folder does not exist")
    first_channels = sorted(root.glob(f"*_0000{layout.FILE_ENDING}"))
    if not first_channels:
        raise DatasetError(f"{root}: no dataset.json and no <case>_0000{layout.FILE_ENDING} files")
    for first in first_channels:
        case_id = first.name[: -len(f"_0000{layout.FILE_ENDING}")]
        images = tuple(
            root / f"{case_id}_{channel:04d}{layout.FILE_ENDING}" for channel in range(n_channels)
        )
        missing = [p.name for p in images if not p.is_file()]
        if missing:
            raise DatasetError(f"case {case_id}: missing channel files {missing} in {root}")
        yield CaseFiles(case_id=case_id, subject_id=case_id, images=images, label=None)


def _probabilities(
    model: TrainedModel,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    device,
    sw_batch_size,
    overlap,
    progress: bool,
) -> np.ndarray:
    """Class probabilities ``(K, X, Y, Z)`` on the input's own grid."""
    target_spacing = model.meta.get("target_spacing")
    normed, _, _ = prepare_image(image, affine, target_spacing)
    tensor = torch.from_numpy(normed)[None]
    probs = predict_volume(
        model.net,
        tensor,
        model.roi_size,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        device=device,
        progress=progress,
    )[0].numpy()
    if probs.shape[1:] != image.shape[1:]:  # the model works at another spacing: back to input
        probs = np.stack([resample_volume(p, image.shape[1:], order=1) for p in probs])
    return probs


def predict_cases(
    checkpoint: str | os.PathLike,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    skeleton_checkpoint: str | os.PathLike | None = None,
    case_ids: Sequence[str] | None = None,
    threshold: float | None = None,
    roi_size: Sequence[int] | None = None,
    validate_input: bool = True,
    device: str | None = None,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    connectivity: int = 6,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predict the input cases (all, or ``case_ids``); returns the per-case exam summaries (also
    written as JSON)."""
    lesion_model = load_trained_model(checkpoint, expected_task="lesion")
    skeleton_model = (
        load_trained_model(skeleton_checkpoint, expected_task="skeleton")
        if skeleton_checkpoint
        else None
    )
    if threshold is None:
        threshold = lesion_model.threshold
    if threshold is None:
        log.warning(
            "no tuned threshold in %s: pass --threshold, or put the threshold.json that "
            "sap evaluate --tune writes on the tuning fold into the run folder; using %.2f",
            checkpoint,
            DEFAULT_THRESHOLD,
        )
        threshold = DEFAULT_THRESHOLD
    compute_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for model in (lesion_model, skeleton_model):
        if model is not None:
            model.net.to(compute_device)
            if roi_size is not None:
                multiple = get_spec(model.meta["backbone"]).input_multiple(
                    model.meta["backbone_kwargs"]
                )
                model.roi_size = sliding_window_size(model.roi_size, multiple, roi_size)
    region_names = None
    if skeleton_model is not None:
        region_names = dict(enumerate(skeleton_model.meta.get("label_names") or []))
    cases = list(
        iter_input_cases(input_path, int(lesion_model.meta["in_channels"]), validate_input)
    )
    if case_ids is not None:
        by_id = {case.case_id: case for case in cases}
        unknown = sorted(set(case_ids) - set(by_id))
        if unknown:
            raise DatasetError(f"{input_path}: no input case named {unknown}")
        cases = [by_id[case_id] for case_id in case_ids]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(
        device=compute_device, sw_batch_size=sw_batch_size, overlap=overlap, progress=progress
    )
    summaries = []
    for case in cases:
        image, _, affine = read_case_arrays(case)
        lesion_prob = _probabilities(lesion_model, image, affine, **settings)[1]
        # Threshold the probabilities as stored, so the mask equals what a reader of the
        # probability file gets at the same threshold.
        lesion_prob = np.rint(lesion_prob * layout.PROBABILITY_SCALE) / layout.PROBABILITY_SCALE
        mask = (lesion_prob >= threshold).astype(np.uint8)
        skeleton = None
        if skeleton_model is not None:
            skeleton_probs = _probabilities(skeleton_model, image, affine, **settings)
            skeleton = relabel_skeleton_by_component(skeleton_probs.argmax(0).astype(np.uint8))
        _remove_case_outputs(out, case.case_id)
        if skeleton is not None:
            layout.save_nifti(
                out / f"{case.case_id}_skeleton{layout.FILE_ENDING}", skeleton, affine
            )
        layout.save_probability_nifti(
            out / f"{case.case_id}_prob{layout.FILE_ENDING}", lesion_prob, affine
        )
        layout.save_nifti(out / f"{case.case_id}{layout.FILE_ENDING}", mask, affine)
        table = lesion_table(
            mask,
            lesion_prob,
            affine,
            skeleton=skeleton,
            region_names=region_names,
            connectivity=connectivity,
        )
        with atomic_path(out / f"{case.case_id}_lesions.csv") as tmp:
            table.to_csv(tmp, index=False)
        summary = {"case_id": case.case_id, "threshold": float(threshold), **exam_summary(table)}
        write_json(out / f"{case.case_id}_summary.json", summary)
        summaries.append(summary)
        log.info(
            "%s: %d lesions, %.2f mL", case.case_id, summary["lesions"], summary["total_volume_ml"]
        )
    return summaries


def case_output_paths(out_dir: str | os.PathLike, case_id: str) -> list[Path]:
    """Every file ``sap predict`` may write for a case, the summary (written last) first."""
    out = Path(out_dir)
    return [
        out / f"{case_id}_summary.json",
        out / f"{case_id}_lesions.csv",
        out / f"{case_id}{layout.FILE_ENDING}",
        out / f"{case_id}_prob{layout.FILE_ENDING}",
        out / f"{case_id}_skeleton{layout.FILE_ENDING}",
    ]


def _remove_case_outputs(out_dir: Path, case_id: str) -> None:
    for path in case_output_paths(out_dir, case_id):
        path.unlink(missing_ok=True)
