"""N4 bias-field correction (SimpleITK) of one station, inside a body mask.

Receive coils make each station brighter near the coil and darker in its depth: a smooth
multiplicative field that intensity standardisation (one factor per station) cannot remove. N4
estimates it as a smooth log-field inside the body (Otsu's threshold, holes filled), on a
shrunken copy for speed; the field is then evaluated at full resolution and divided out. For
DWI, one field per station is estimated on the lowest b-value (the best signal) and divided out
of every b-value of that station, so their ratio, and with it the ADC, is unchanged.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

SHRINK = 2
"""In-plane shrink factor of the copy the field is estimated on."""
ITERATIONS = (50, 40, 30)
"""N4 iterations per fitting level (three levels)."""


def body_mask(image: sitk.Image) -> sitk.Image:
    """Otsu's threshold of the log intensity with holes filled (uint8 0/1).

    On the logarithm the body separates from the air's noise floor: on raw intensities a
    diffusion image's few very bright structures (spleen, brain, nodes) take Otsu's upper class
    and the dim muscle falls in with the air."""
    positive = sitk.Clamp(image, lowerBound=0.0)
    floor = max(float(np.percentile(sitk.GetArrayViewFromImage(positive), 99)) * 1e-3, 1e-6)
    log = sitk.Log(positive + floor)
    mask = sitk.OtsuThreshold(log, 0, 1, 128)
    return sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)


def estimate_log_field(image: sitk.Image) -> sitk.Image | None:
    """The log bias field of ``image`` on its own grid; ``None`` when no body is found."""
    image = sitk.Cast(sitk.Clamp(image, lowerBound=0.0), sitk.sitkFloat32)
    mask = body_mask(image)
    if int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) < 1000:
        return None
    shrink = [SHRINK if n >= 4 * SHRINK else 1 for n in image.GetSize()[:2]] + [1]
    small, small_mask = sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(ITERATIONS))
    corrector.Execute(small, small_mask)
    return corrector.GetLogBiasFieldAsImage(image)


def divide_field(image: sitk.Image, log_field: sitk.Image) -> sitk.Image:
    """``image`` / exp(``log_field``) (both on one grid), float32."""
    field = np.exp(sitk.GetArrayViewFromImage(log_field).astype(np.float32))
    out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image) / field)
    out.CopyInformation(image)
    return out
