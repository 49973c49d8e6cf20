"""Apparent diffusion coefficient from the b-values of one DWI station.

The signal of a voxel falls as S_b = S_0 exp(-b ADC). Taking logs makes it a line in b, and
ADC is minus its least-squares slope over all b-values of the station (for two b-values this is
ln(S_low / S_high) / (b_high - b_low)). With b in s/mm^2 the slope is in mm^2/s; the map is
stored in 10^-3 mm^2/s (free water at body temperature is about 3).

It is computed per station on the station's own grid, from the scanner's values: before any
intensity standardisation or resampling, which would change the ratio between b-values at the
station borders. Background (lowest-b signal below a fraction of its 99th percentile) is 0, and
values are clipped to [0, ``ADC_MAX``]: noise makes both signs and huge values where there is no
tissue.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import SimpleITK as sitk

ADC_UNIT = 1e-3
"""The map's unit in mm^2/s: values are 10^-3 mm^2/s."""
ADC_MAX = 5.0
"""Upper clip in 10^-3 mm^2/s (free water is about 3)."""
BACKGROUND_FRACTION = 0.05
"""Voxels whose lowest-b signal is below this fraction of its 99th percentile are background."""


def fit_adc(signals: Mapping[float, np.ndarray]) -> np.ndarray:
    """ADC (10^-3 mm^2/s) from ``{b-value (s/mm^2): signal array}`` on one grid (>= 2 b-values)."""
    b_values = sorted(signals)
    if len(b_values) < 2:
        raise ValueError(f"ADC needs at least two b-values, got {b_values}")
    b = np.asarray(b_values, np.float64)
    lowest = np.asarray(signals[b_values[0]], np.float32)
    tiny = np.float32(1e-6 * max(float(np.percentile(lowest, 99)), 1e-12))
    centred = b - b.mean()
    slope = np.zeros(lowest.shape, np.float64)
    log_mean = np.zeros(lowest.shape, np.float64)
    logs = [np.log(np.maximum(np.asarray(signals[v], np.float64), tiny)) for v in b_values]
    for log_signal in logs:
        log_mean += log_signal
    log_mean /= len(logs)
    for weight, log_signal in zip(centred, logs):
        slope += weight * (log_signal - log_mean)
    slope /= float(centred @ centred)
    adc = np.clip(-slope / ADC_UNIT, 0.0, ADC_MAX).astype(np.float32)
    adc[~np.isfinite(adc)] = 0.0
    adc[lowest < BACKGROUND_FRACTION * np.percentile(lowest, 99)] = 0.0
    return adc


def adc_image(signals: Mapping[float, sitk.Image]) -> sitk.Image:
    """:func:`fit_adc` of SimpleITK images on one grid, as an image on that grid."""
    arrays = {b: sitk.GetArrayViewFromImage(image) for b, image in signals.items()}
    adc = sitk.GetImageFromArray(fit_adc(arrays))
    adc.CopyInformation(next(iter(signals.values())))
    return adc
