"""Training augmentations (docs/method.md): flips, 90-degree rotations in the axial plane, intensity
scale and shift per channel, built as TorchIO transforms from ``cfg.data.augment``.

Planes and axes are those of the canonical RAS+ frame every cached array is in
(``dataset/images.py``): the axial plane is array axes 0 and 1 (X-Y), ``flip_axes`` index X (left-
right), Y (anterior-posterior) and Z (head-feet), whatever orientation the files were stored in.

The transforms run on the training *patch* (inside the loader's worker processes), after the
patch was cut from the cache: flips and 90-degree rotations permute voxels exactly, so
augmenting the patch gives the same result as augmenting the whole volume and then cropping,
at a fraction of the cost. Label maps follow every spatial transform (TorchIO applies spatial
transforms to ``LabelMap`` images too); intensity transforms touch ``ScalarImage`` images only.

TorchIO has no exact 90-degree rotation (``RandomAffine`` resamples with interpolation and
draws angles from a continuous range) and no per-channel scale-and-shift, so both are small
``tio.Transform`` subclasses here. MONAI has equivalents (``RandRotate90``,
``RandScaleIntensity`` / ``RandShiftIntensity``), but they work on dicts of arrays, not on
``tio.Subject``: wrapping them would cost more code than the few lines below.

Randomness comes from torch's global generator, as in every TorchIO transform; the patch
dataset seeds it per patch (see ``subjects.PatchDataset``), so augmentations are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio

from sap_lightning.config.schema import AugmentConfig
from sap_lightning.core.errors import ConfigError

AXIAL_PLANE = (0, 1)
"""Array axes of the axial (X-Y) plane. Cached arrays are in the canonical RAS+ frame
(``dataset/images.py``), so axes 0 and 1 are the world's left-right and anterior-posterior
axes whatever voxel order the scanner stored, and axis 2 is head-feet."""


class RandomRot90(tio.transforms.augmentation.RandomTransform, tio.SpatialTransform):
    """Rotate every image of a subject by a random multiple of 90 degrees in one plane.

    With probability ``p`` one of 90, 180 or 270 degrees is drawn uniformly. When the two
    in-plane sizes differ, a quarter turn would change the patch shape (and break batching),
    so only the half turn is drawn then. The affine is left unchanged: training patches are
    never written to disk or resampled.
    """

    def __init__(self, axes: Sequence[int] = AXIAL_PLANE, **kwargs) -> None:
        super().__init__(**kwargs)
        axes = tuple(int(a) for a in axes)
        if len(axes) != 2 or len(set(axes)) != 2 or not set(axes) <= {0, 1, 2}:
            raise ValueError(f"RandomRot90 needs two different spatial axes of 0, 1, 2: {axes}")
        self.axes = axes
        self.args_names = ["axes"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        shape = subject.spatial_shape
        square = shape[self.axes[0]] == shape[self.axes[1]]
        quarter_turns = int(torch.randint(1, 4, (1,)).item()) if square else 2
        dims = (self.axes[0] + 1, self.axes[1] + 1)  # skip the channel dimension
        for image in self.get_images(subject):
            image.set_data(torch.rot90(image.data, quarter_turns, dims=dims).contiguous())
        return subject


class RandomScaleShift(tio.transforms.augmentation.RandomTransform, tio.IntensityTransform):
    """``x * a_c + b_c`` with ``a_c ~ U[1 - scale, 1 + scale]``, ``b_c ~ U[-shift, shift]`` drawn
    independently for each channel ``c`` (docs/method.md: intensity scale and shift)."""

    def __init__(self, scale: float = 0.1, shift: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= scale < 1.0:
            raise ValueError(f"scale must be in [0, 1) so the factor stays positive: {scale}")
        if shift < 0.0:
            raise ValueError(f"shift must be non-negative: {shift}")
        self.scale = float(scale)
        self.shift = float(shift)
        self.args_names = ["scale", "shift"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            # In place: with copy=True TorchIO handed us a deep copy, with copy=False the caller
            # asked for the subject to be modified.
            data = image.data.float()
            n_channels = data.shape[0]
            factor = 1.0 + (2.0 * torch.rand(n_channels) - 1.0) * self.scale
            offset = (2.0 * torch.rand(n_channels) - 1.0) * self.shift
            data.mul_(factor.view(-1, 1, 1, 1)).add_(offset.view(-1, 1, 1, 1))
            image.set_data(data)
        return subject


def check_augment_config(cfg: AugmentConfig) -> None:
    """Raise ``ConfigError`` for values the transforms cannot honour."""
    bad_axes = [a for a in cfg.flip_axes if a not in (0, 1, 2)]
    if bad_axes:
        raise ConfigError(f"'data.augment.flip_axes' must be among 0, 1, 2; got {cfg.flip_axes}")
    for key in ("flip_p", "rot90_p", "intensity_p"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"'data.augment.{key}' is a probability in [0, 1]; got {value}")
    if not 0.0 <= cfg.intensity_scale < 1.0:
        raise ConfigError(
            f"'data.augment.intensity_scale' must be in [0, 1); got {cfg.intensity_scale}"
        )
    if cfg.intensity_shift < 0.0:
        raise ConfigError(f"'data.augment.intensity_shift' must be >= 0; got {cfg.intensity_shift}")


def build_augmentation(cfg: AugmentConfig) -> tio.Compose:
    """The training transform for ``cfg``; augmentations with probability 0 are left out, so an
    all-zero config gives an empty (identity) ``Compose``.

    Transforms modify the patch in place (``copy=False``): the patch is a fresh object built for
    this one call, so TorchIO's defensive deep copy of every input would only cost time.
    """
    check_augment_config(cfg)
    transforms: list[tio.Transform] = []
    if cfg.flip_p > 0 and cfg.flip_axes:
        transforms.append(
            tio.RandomFlip(
                axes=tuple(int(a) for a in cfg.flip_axes),
                flip_probability=cfg.flip_p,
                copy=False,
            )
        )
    if cfg.rot90_p > 0:
        transforms.append(RandomRot90(AXIAL_PLANE, p=cfg.rot90_p, copy=False))
    if cfg.intensity_p > 0 and (cfg.intensity_scale > 0 or cfg.intensity_shift > 0):
        transforms.append(
            RandomScaleShift(
                cfg.intensity_scale, cfg.intensity_shift, p=cfg.intensity_p, copy=False
            )
        )
    return tio.Compose(transforms, copy=False)
