"""``sap predict``: whole-volume lesion (and optionally skeleton) prediction with a burden report.

Per case it writes (all atomically, in the layout of ``inference/outputs.py``, which nnU-Net
reads as a prediction folder): ``<case>.nii.gz`` (uint8 mask at the run's tuned threshold),
``probabilities/<case>.nii.gz`` (16-bit lesion probability, see
``layout.save_probability_nifti``), ``skeleton/<case>.nii.gz`` (with a skeleton model: 10-class
map, each bone component relabelled to its majority class), ``<case>_lesions.csv`` (lesion table)
and ``<case>_summary.json`` (lesion count and volume overall and per skeletal region, and the
checkpoint hash); ``prediction.json`` records the provenance of the whole folder. The
probability and mask files are exactly what ``sap evaluate`` reads.

Every input is validated before any work, so a broken file stops the command before anything is
written: a dataset with ``require_valid_dataset``, a plain folder with the same per-file checks
(``check_case_files``: missing or extra channel files, non-3D files, NaN/Inf voxels, constant
channels, channels on different grids). The dataset's channel names are matched to the model's
by name (reordered when only the order differs, refused when the sets differ); a plain folder is
taken in the model's order. Images are predicted in the canonical RAS+ frame
(``dataset/images.py``) and every output is written back in the input's own voxel order, affine
and shape. A case's previous outputs are removed before its new
ones are written, summary first, and its summary is written last: after an interruption a case
never mixes files of two runs, and a case with a summary is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sap_lightning.backbones import create_backbone, get_spec
from sap_lightning.backbones.checkpoints import read_checkpoint
from sap_lightning.backbones.transfer import transfer_weights
from sap_lightning.cache import compute_body_mask, prepare_image, resample_volume
from sap_lightning.config.schema import ValidationConfig
from sap_lightning.core.errors import CheckpointError, ConfigError, DatasetError, SapError
from sap_lightning.core.mixed_precision import effective_precision
from sap_lightning.core.precision import AUTOCAST_PRECISIONS
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY, DEFAULT_THRESHOLD
from sap_lightning.core.run_layout import THRESHOLD_FILE, last_checkpoint_path, load_threshold
from sap_lightning.core.windows import (
    predict_volume,
    sliding_window_size,
)
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import image_file_ending
from sap_lightning.dataset.validate import (
    CaseFiles,
    Problem,
    check_case_files,
    load_dataset,
    read_case,
    require_valid_dataset,
)
from sap_lightning.inference.burden import exam_summary, lesion_table, relabel_skeleton_by_component
from sap_lightning.inference.outputs import make_provenance, prepare_output_folder, write_case

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
    precision: str = "32-true"
    """Whole-case inference precision: the run's ``validation.precision`` as recorded (older
    checkpoints: float32), or what the caller asks for."""
    sw_batch_size: int = ValidationConfig.sw_batch_size
    """Windows per forward pass: the run's ``validation.sw_batch_size`` as recorded (older
    checkpoints: the schema default), or what the caller asks for. Speed and memory only."""

    @property
    def task(self) -> str:
        return str(self.meta.get("task"))

    @property
    def channel_names(self) -> tuple[str, ...] | None:
        """The input channels the network was trained on, in order (``None``: not recorded)."""
        names = self.meta.get("channel_names")
        return tuple(str(name) for name in names) if names else None

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """The (canonical X, Y, Z) spacing in mm of the training data, if recorded."""
        spacing = self.meta.get("spacing")
        return tuple(float(s) for s in spacing) if spacing else None


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
    names = meta.get("channel_names")
    if names and len(names) != int(meta["in_channels"]):
        raise CheckpointError(
            f"{checkpoint_path}: metadata names {len(names)} channels {list(names)} for a "
            f"{meta['in_channels']}-channel network"
        )
    net = create_backbone(
        meta["backbone"], meta["in_channels"], meta["out_channels"], **meta["backbone_kwargs"]
    )
    transfer_weights(net, checkpoint, mode="full")
    net.eval()
    multiple = get_spec(meta["backbone"]).input_multiple(meta["backbone_kwargs"])
    patch = meta.get("patch_size") or [multiple * 4] * 3
    window = sliding_window_size(patch, multiple, meta.get("roi_size"))
    precision = meta.get("inference_precision") or "32-true"
    if precision not in AUTOCAST_PRECISIONS:
        raise CheckpointError(
            f"{checkpoint_path}: metadata names inference precision {precision!r}, not one of "
            f"{list(AUTOCAST_PRECISIONS)}"
        )
    sw_batch_size = meta.get("sw_batch_size", ValidationConfig.sw_batch_size)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise CheckpointError(
            f"{checkpoint_path}: metadata names {sw_batch_size!r} windows per forward pass "
            "(sw_batch_size), not a positive whole number"
        )
    return TrainedModel(net, dict(meta), window, threshold, path, precision, sw_batch_size)


SPACING_TOLERANCE = 0.05
"""Relative spacing difference per axis above which an input is reported as off the model's
training spacing (a network sees voxels, so a different spacing changes apparent sizes)."""


def iter_input_cases(
    input_path: str | os.PathLike,
    n_channels: int,
    validate: bool = True,
    model_channels: Sequence[str] | None = None,
) -> Iterator[CaseFiles]:
    """Cases of a dataset folder or of a plain folder of ``<case>_XXXX`` files, every case's
    images in the model's channel order. Nothing is yielded before the input is validated.

    A dataset (``dataset.json``; labels optional) is validated unless ``validate=False`` (for a
    caller that has just validated it); its ``channel_names`` are matched to ``model_channels``
    by name: the same names in another order are reordered, another set is refused. A plain
    folder (nnU-Net's ``imagesTs`` style) has no names: channel files are taken in the model's
    order, after the per-file checks of :func:`check_case_files`.
    """
    root = Path(input_path)
    if (root / layout.DATASET_JSON).is_file():
        info = require_valid_dataset(root, require_labels=False) if validate else load_dataset(root)
        where = f"{root / layout.DATASET_JSON}"
        order = _channel_order(info.channel_names, model_channels, n_channels, where)
        for case in info.cases:
            yield dataclasses.replace(case, images=tuple(case.images[i] for i in order))
        return
    if not root.is_dir():
        raise DatasetError(f"{root}: input folder does not exist")
    cases, problems = _plain_folder_cases(root, n_channels)
    if not cases and not problems:
        raise DatasetError(f"{root}: no dataset.json and no <case>_0000{layout.FILE_ENDING} files")
    if validate:
        for case in cases:
            problems += check_case_files(case.case_id, case.images)
    if problems:
        raise DatasetError("\n".join(f"input {root}: {problem}" for problem in problems))
    order = ", ".join(model_channels) if model_channels else f"{n_channels} unnamed channels"
    log.info(
        "%s: plain folder without dataset.json: files _0000.._%04d are taken in the model's "
        "channel order (%s)",
        root,
        n_channels - 1,
        order,
    )
    yield from cases


_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _plain_folder_cases(root: Path, n_channels: int) -> tuple[list[CaseFiles], list[Problem]]:
    """Group a plain folder's ``<case>_XXXX<ending>`` files by case; naming problems."""
    found: dict[str, dict[int, list[Path]]] = {}
    problems: list[Problem] = []
    for path in sorted(root.iterdir()):
        ending = image_file_ending(path)
        if path.name.startswith(".") or ending is None:
            continue  # not an image: hidden files, notes, outputs of other tools
        match = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if match is None:
            problems.append(
                Problem(None, path.name, f"image not named <case>_XXXX{ending}: no case/channel")
            )
            continue
        channel = int(match["channel"])
        found.setdefault(match["case"], {}).setdefault(channel, []).append(path)
    cases = []
    for case_id in sorted(found):
        channels = found[case_id]
        for channel, paths in sorted(channels.items()):
            names = ", ".join(p.name for p in paths)
            if channel >= n_channels:
                message = f"extra channel {channel}: the model takes {n_channels} channels"
                problems.append(Problem(case_id, names, message))
            elif len(paths) > 1:
                problems.append(Problem(case_id, names, f"several files for channel {channel}"))
        images = tuple(
            channels[channel][0]
            if channel in channels
            else root / f"{case_id}_{channel:04d}{layout.FILE_ENDING}"
            for channel in range(n_channels)
        )
        cases.append(CaseFiles(case_id=case_id, subject_id=case_id, images=images, label=None))
    return cases, problems


def _channel_order(
    given: Sequence[str], wanted: Sequence[str] | None, n_channels: int, where: str
) -> list[int]:
    """Indices into ``given`` that put its channels in ``wanted``'s order (refuses other sets)."""
    given = list(given)
    if not wanted:  # a checkpoint without names: only the count can be checked
        if len(given) != n_channels:
            raise DatasetError(
                f"{where}: channel_names {given} has {len(given)} channels, the model takes "
                f"{n_channels}"
            )
        return list(range(n_channels))
    wanted = list(wanted)
    if sorted(given) != sorted(wanted) or len(set(given)) != len(given):
        raise DatasetError(
            f"{where}: channel_names {given} differ from the model's input channels {wanted}"
        )
    order = [given.index(name) for name in wanted]
    if order != list(range(len(order))):
        log.info("%s: channels %s reordered by name to the model's order %s", where, given, wanted)
    return order


def _skeleton_channel_order(lesion: TrainedModel, skeleton: TrainedModel) -> list[int]:
    """Indices into the lesion model's channels that give the skeleton model's input."""
    n_lesion, n_skeleton = int(lesion.meta["in_channels"]), int(skeleton.meta["in_channels"])
    if lesion.channel_names and skeleton.channel_names:
        if sorted(lesion.channel_names) == sorted(skeleton.channel_names):
            return [lesion.channel_names.index(name) for name in skeleton.channel_names]
    elif n_lesion == n_skeleton:
        return list(range(n_lesion))
    raise CheckpointError(
        f"{skeleton.source}: the skeleton model takes channels "
        f"{skeleton.channel_names or f'{n_skeleton} unnamed'}, the lesion model "
        f"{lesion.channel_names or f'{n_lesion} unnamed'}"
    )


def _check_spacing(model: TrainedModel, case_id: str, affine: np.ndarray) -> None:
    """Warn when a case's spacing is off the model's training spacing (unless resampled)."""
    if model.meta.get("target_spacing") is not None or model.spacing is None:
        return  # prepare_image resamples to the model's spacing, or there is nothing to compare
    ours = np.asarray(layout.spacing_of(affine))
    theirs = np.asarray(model.spacing)
    if np.any(np.abs(ours - theirs) > SPACING_TOLERANCE * theirs):
        log.warning(
            "case %s: spacing %s mm differs by more than %d%% from the %s model's training "
            "spacing %s mm (X, Y, Z in RAS+); predicting without resampling",
            case_id,
            tuple(round(float(s), 3) for s in ours),
            round(SPACING_TOLERANCE * 100),
            model.task,
            tuple(round(float(s), 3) for s in theirs),
        )


def _probabilities(
    model: TrainedModel,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    case_id: str,
    device,
    overlap,
    progress: bool,
    channels: Sequence[int] | None = None,
) -> np.ndarray:
    """Class probabilities ``(K, X, Y, Z)`` on the input's (canonical) grid (only the classes
    in ``channels`` when given: the lesion map needs one class of the whole volume, not K).

    Non-finite probabilities are an error naming the case: a NaN map would otherwise threshold
    to an empty mask and report a healthy exam.
    """
    target_spacing = model.meta.get("target_spacing")
    normed, grid_affine, _ = prepare_image(image, affine, target_spacing)
    body = None
    if model.meta.get("body_only"):  # validation.body_only: the mask the cache would store
        body = torch.from_numpy(compute_body_mask(normed, grid_affine))[None, None]
    tensor = torch.from_numpy(normed)[None]
    del normed  # the tensor shares its memory
    probs = predict_volume(
        model.net,
        tensor,
        model.roi_size,
        sw_batch_size=model.sw_batch_size,
        overlap=overlap,
        device=device,
        progress=progress,
        channels=channels,
        body=body,
        precision=model.precision,
    )[0].numpy()
    del tensor
    # Softmax of finite logits is finite: NaN/Inf logits leave NaN, which isnan finds (and
    # torch's reduction is multithreaded, without numpy's whole-volume boolean temporary).
    non_finite = int(torch.from_numpy(probs).isnan().sum()) + int(
        torch.from_numpy(probs).isinf().sum()
    )
    if non_finite:
        raise SapError(
            f"case {case_id}: the {model.task} network of {model.source} output {non_finite} "
            "NaN/Inf probabilities (broken weights?); no result is written for it"
        )
    if probs.shape[1:] != image.shape[1:]:  # the model works at another spacing: back to input
        probs = np.stack([resample_volume(p, image.shape[1:], order=1) for p in probs])
    return probs


def as_stored(probability: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The probability map as the 16-bit file stores it, and the uint8 mask at ``threshold``.

    Thresholding the stored values makes the mask equal what a reader of the probability file
    gets at the same threshold. Works in place on ``probability`` (the caller's own float32
    map): no whole-volume temporaries.
    """
    probability = np.ascontiguousarray(probability, dtype=np.float32)
    probability *= np.float32(layout.PROBABILITY_SCALE)
    np.rint(probability, out=probability)
    probability /= np.float32(layout.PROBABILITY_SCALE)
    return probability, (probability >= threshold).view(np.uint8)


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
    sw_batch_size: int | None = None,
    overlap: float = 0.25,
    connectivity: int = DEFAULT_CONNECTIVITY,
    progress: bool = True,
    overwrite: bool = False,
    precision: str | None = None,
) -> list[dict[str, Any]]:
    """Predict the input cases (all, or ``case_ids``); returns the per-case exam summaries (also
    written as JSON).

    ``out_dir`` must be empty, or this model's own folder (same checkpoint hash, threshold,
    window and precision, see ``outputs.prepare_output_folder``); another model's outputs there
    are refused before anything is written, or cleared first with ``overwrite``.
    ``precision`` (one of ``AUTOCAST_PRECISIONS``) and ``sw_batch_size`` override what each
    checkpoint records (its run's ``validation`` settings).
    """
    if precision is not None and precision not in AUTOCAST_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(AUTOCAST_PRECISIONS)}")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size {sw_batch_size} must be >= 1")
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
        )
        threshold = DEFAULT_THRESHOLD
    compute_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for model in (lesion_model, skeleton_model):
        if model is not None:
            model.net.to(compute_device)
            # What runs here (and so what prediction.json records): float32 on a CPU
            # without fast kernels for the recorded type.
            model.precision = effective_precision(precision or model.precision, compute_device)
            if sw_batch_size is not None:
                model.sw_batch_size = sw_batch_size
            if roi_size is not None:
                multiple = get_spec(model.meta["backbone"]).input_multiple(
                    model.meta["backbone_kwargs"]
                )
                model.roi_size = sliding_window_size(model.roi_size, multiple, roi_size)
    region_names = None
    if skeleton_model is not None:
        region_names = dict(enumerate(skeleton_model.meta.get("label_names") or []))
    skeleton_order = None
    if skeleton_model is not None:  # the skeleton network may list the channels in another order
        skeleton_order = _skeleton_channel_order(lesion_model, skeleton_model)
    cases = list(
        iter_input_cases(
            input_path,
            int(lesion_model.meta["in_channels"]),
            validate_input,
            lesion_model.channel_names,
        )
    )
    if case_ids is not None:
        by_id = {case.case_id: case for case in cases}
        unknown = sorted(set(case_ids) - set(by_id))
        if unknown:
            raise DatasetError(f"{input_path}: no input case named {unknown}")
        cases = [by_id[case_id] for case_id in case_ids]
    provenance = make_provenance(
        checkpoint,
        lesion_model.roi_size,
        threshold,
        overlap,
        input_path,
        skeleton_checkpoint=skeleton_checkpoint if skeleton_model is not None else None,
        skeleton_window=skeleton_model.roi_size if skeleton_model is not None else None,
        connectivity=connectivity,
        body_only=bool(lesion_model.meta.get("body_only")),
        precision=lesion_model.precision,
        skeleton_precision=skeleton_model.precision if skeleton_model is not None else None,
    )
    out = prepare_output_folder(out_dir, provenance, overwrite=overwrite)
    settings = dict(device=compute_device, overlap=overlap, progress=progress)
    summaries = []
    for case in cases:
        # Canonical RAS+ arrays in, probabilities back in the input's own voxel order.
        arrays = read_case(case)
        image, source = arrays.image, arrays.source
        _check_spacing(lesion_model, case.case_id, arrays.affine)
        lesion_prob = _probabilities(
            lesion_model, image, arrays.affine, case_id=case.case_id, channels=[1], **settings
        )[0]
        lesion_prob, mask = as_stored(source.from_canonical(lesion_prob), threshold)
        skeleton = None
        if skeleton_model is not None:
            if skeleton_order is not None:
                image = image[skeleton_order]
            _check_spacing(skeleton_model, case.case_id, arrays.affine)
            skeleton_probs = _probabilities(
                skeleton_model, image, arrays.affine, case_id=case.case_id, **settings
            )
            skeleton = relabel_skeleton_by_component(skeleton_probs.argmax(0).astype(np.uint8))
            skeleton = source.from_canonical(skeleton)
        affine = source.affine  # every output in the input's own frame
        table = lesion_table(
            mask,
            lesion_prob,
            affine,
            skeleton=skeleton,
            region_names=region_names,
            connectivity=connectivity,
        )
        summary = write_case(
            out,
            provenance,
            case.case_id,
            affine=affine,
            mask=mask,
            probability=lesion_prob,
            table=table,
            summary=exam_summary(table),
            skeleton=skeleton,
            header=source.header,  # None for .mha / .nrrd inputs
        )
        summaries.append(summary)
        log.info(
            "%s: %d lesions, %.2f mL", case.case_id, summary["lesions"], summary["total_volume_ml"]
        )
    return summaries
