"""``sap predict``: whole-volume lesion (and optionally skeleton) prediction with a burden report.

:class:`Predictor` holds the trained model(s) and every inference setting (as nnU-Net's
predictor does); :meth:`Predictor.predict` runs them over an input folder. Per case it writes
(all atomically, in the layout of ``inference/outputs.py``, which nnU-Net reads as a prediction
folder): ``<case>.nii.gz`` (uint8 mask at the run's tuned threshold),
``probabilities/<case>.nii.gz`` (16-bit lesion probability, see
``layout.save_probability_nifti``), ``skeleton/<case>.nii.gz`` (with a skeleton model: 10-class
map, each bone component relabelled to its majority class), ``<case>_lesions.csv`` (lesion table)
and ``<case>_summary.json`` (lesion count and volume overall and per skeletal region, and the
checkpoint hash) and ``<case>_mip.png`` (coronal and sagittal b1000 MIPs with the lesions
outlined by skeletal region, ``inference/pictures``); ``prediction.json`` records the
provenance of the whole folder. The
probability and mask files are exactly what ``sap evaluate`` reads.

Every input is validated before any work (``inference/inputs.py``), so a broken file stops the
command before anything is written. Images are predicted in the canonical RAS+ frame
(``dataset/images.py``) and every output is written back in the input's own voxel order, affine
and shape. A case's previous outputs are removed before its new ones are written, summary
first, and its summary is written last: after an interruption a case never mixes files of two
runs, and a case with a summary is complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from sap_lightning.backbones import get_spec
from sap_lightning.cache import compute_body_mask, prepare_image, resample_volume
from sap_lightning.core.errors import CheckpointError, ConfigError, DatasetError, SapError
from sap_lightning.core.mixed_precision import effective_precision
from sap_lightning.core.precision import AUTOCAST_PRECISIONS
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY, DEFAULT_THRESHOLD
from sap_lightning.core.run_layout import THRESHOLD_FILE
from sap_lightning.core.windows import predict_volume, sliding_window_size
from sap_lightning.dataset import layout
from sap_lightning.dataset.info import CaseFiles, read_case
from sap_lightning.inference.burden import exam_summary, lesion_table, relabel_skeleton_by_component
from sap_lightning.inference.inputs import iter_input_cases
from sap_lightning.inference.models import TrainedModel, load_trained_model
from sap_lightning.inference.outputs import make_provenance, prepare_output_folder, write_case
from sap_lightning.inference.pictures import b1000_channel_of, draw_case

log = logging.getLogger(__name__)

__all__ = [
    "THRESHOLD_FILE",
    "Predictor",
    "as_stored",
    "load_trained_model",
    "predict_probabilities",
]

SPACING_TOLERANCE = 0.05
"""Relative spacing difference per axis above which an input is reported as off the model's
training spacing (a network sees voxels, so a different spacing changes apparent sizes)."""


class Predictor:
    """A lesion network (and optionally a skeleton network) with the settings it predicts at.

    Built once, it predicts any number of input folders. ``threshold`` defaults to the run's
    tuned one (``threshold.json`` in the run folder), else :data:`DEFAULT_THRESHOLD` with a
    warning; ``precision``, ``sw_batch_size`` and ``roi_size`` override what each checkpoint
    records (its run's ``validation`` settings); ``device`` defaults to CUDA when present.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        skeleton_checkpoint: str | os.PathLike | None = None,
        threshold: float | None = None,
        roi_size: Sequence[int] | None = None,
        device: str | None = None,
        sw_batch_size: int | None = None,
        overlap: float = 0.25,
        connectivity: int = DEFAULT_CONNECTIVITY,
        precision: str | None = None,
        progress: bool = True,
        pictures: bool = True,
    ) -> None:
        if precision is not None and precision not in AUTOCAST_PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {list(AUTOCAST_PRECISIONS)}")
        if sw_batch_size is not None and sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size {sw_batch_size} must be >= 1")
        self.checkpoint = checkpoint
        self.skeleton_checkpoint = skeleton_checkpoint
        self.lesion = load_trained_model(checkpoint, expected_task="lesion")
        self.skeleton = (
            load_trained_model(skeleton_checkpoint, expected_task="skeleton")
            if skeleton_checkpoint
            else None
        )
        if threshold is None:
            threshold = self.lesion.threshold
        if threshold is None:
            log.warning(
                "no tuned threshold in %s: pass --threshold, or put the threshold.json that "
                "sap evaluate --tune writes on the tuning fold into the run folder; using %.2f",
                checkpoint,
                DEFAULT_THRESHOLD,
            )
            threshold = DEFAULT_THRESHOLD
        self.threshold = float(threshold)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.overlap = overlap
        self.connectivity = connectivity
        self.progress = progress
        self.pictures = pictures
        for model in self.models:
            model.net.to(self.device)
            # What runs here (and so what prediction.json records): float32 on a CPU
            # without fast kernels for the recorded type.
            model.precision = effective_precision(precision or model.precision, self.device)
            if sw_batch_size is not None:
                model.sw_batch_size = sw_batch_size
            if roi_size is not None:
                multiple = get_spec(model.meta["backbone"]).input_multiple(
                    model.meta["backbone_kwargs"]
                )
                model.roi_size = sliding_window_size(model.roi_size, multiple, roi_size)
        # The skeleton network may list the channels in another order.
        self.skeleton_order = (
            _skeleton_channel_order(self.lesion, self.skeleton) if self.skeleton else None
        )

    @property
    def models(self) -> list[TrainedModel]:
        return [model for model in (self.lesion, self.skeleton) if model is not None]

    def provenance(self, input_path: str | os.PathLike) -> dict[str, Any]:
        """The ``prediction.json`` record of this predictor on ``input_path``."""
        skeleton = self.skeleton
        return make_provenance(
            self.checkpoint,
            self.lesion.roi_size,
            self.threshold,
            self.overlap,
            input_path,
            skeleton_checkpoint=self.skeleton_checkpoint if skeleton is not None else None,
            skeleton_window=skeleton.roi_size if skeleton is not None else None,
            connectivity=self.connectivity,
            body_only=bool(self.lesion.meta.get("body_only")),
            precision=self.lesion.precision,
            skeleton_precision=skeleton.precision if skeleton is not None else None,
            pictures=self.pictures,
        )

    def predict(
        self,
        input_path: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        case_ids: Sequence[str] | None = None,
        validate_input: bool = True,
        overwrite: bool = False,
    ) -> list[dict[str, Any]]:
        """Predict the input cases (all, or ``case_ids``) into ``out_dir``; returns the per-case
        exam summaries (also written as JSON).

        ``out_dir`` must be empty, or this model's own folder (same checkpoint hash, threshold,
        window and precision, see ``outputs.prepare_output_folder``); another model's outputs
        there are refused before anything is written, or cleared first with ``overwrite``.
        """
        cases = list(
            iter_input_cases(
                input_path,
                int(self.lesion.meta["in_channels"]),
                validate_input,
                self.lesion.channel_names,
            )
        )
        if case_ids is not None:
            by_id = {case.case_id: case for case in cases}
            unknown = sorted(set(case_ids) - set(by_id))
            if unknown:
                raise DatasetError(f"{input_path}: no input case named {unknown}")
            cases = [by_id[case_id] for case_id in case_ids]
        provenance = self.provenance(input_path)
        out = prepare_output_folder(out_dir, provenance, overwrite=overwrite)
        summaries = []
        for case in cases:
            summary = self._predict_case(case, out, provenance)
            summaries.append(summary)
            log.info(
                "%s: %d lesions, %.2f mL",
                case.case_id,
                summary["lesions"],
                summary["total_volume_ml"],
            )
        return summaries

    def _predict_case(
        self, case: CaseFiles, out: os.PathLike, provenance: dict[str, Any]
    ) -> dict[str, Any]:
        # Canonical RAS+ arrays in, outputs back in the input's own voxel order.
        arrays = read_case(case)
        image, source = arrays.image, arrays.source
        settings = dict(device=self.device, overlap=self.overlap, progress=self.progress)
        _check_spacing(self.lesion, case.case_id, arrays.affine)
        lesion_prob = predict_probabilities(
            self.lesion, image, arrays.affine, case_id=case.case_id, channels=[1], **settings
        )[0]
        lesion_prob, mask = as_stored(source.from_canonical(lesion_prob), self.threshold)
        channels = self.lesion.channel_names or [str(i) for i in range(len(image))]
        b1000 = source.from_canonical(image[b1000_channel_of(channels)])
        skeleton = None
        region_names = None
        if self.skeleton is not None:
            if self.skeleton_order is not None:
                image = image[self.skeleton_order]
            _check_spacing(self.skeleton, case.case_id, arrays.affine)
            skeleton_probs = predict_probabilities(
                self.skeleton, image, arrays.affine, case_id=case.case_id, **settings
            )
            skeleton = relabel_skeleton_by_component(skeleton_probs.argmax(0).astype(np.uint8))
            skeleton = source.from_canonical(skeleton)
            region_names = dict(enumerate(self.skeleton.meta.get("label_names") or []))
        affine = source.affine  # every output in the input's own frame
        table = lesion_table(
            mask,
            lesion_prob,
            affine,
            skeleton=skeleton,
            region_names=region_names,
            connectivity=self.connectivity,
        )
        return write_case(
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
            picture=partial(
                draw_case,
                b1000,
                affine,
                prediction=mask,
                skeleton=skeleton,
                region_names=region_names,
                title=case.case_id,
                connectivity=self.connectivity,
            )
            if self.pictures
            else None,
        )


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


def predict_probabilities(
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
