"""ADC fit of one DWI station and the N4 bias field shared by its b-values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from sap_lightning.scanner import bias
from sap_lightning.scanner.adc import ADC_MAX, adc_image, fit_adc


def _signals(adc_map: np.ndarray, s0: np.ndarray, b_values) -> dict[float, np.ndarray]:
    """S_b = S_0 exp(-b ADC), ADC in 10^-3 mm^2/s, b in s/mm^2."""
    return {b: (s0 * np.exp(-b * adc_map * 1e-3)).astype(np.float32) for b in b_values}


@pytest.mark.parametrize("b_values", [(50.0, 1000.0), (0.0, 400.0, 800.0), (50.0, 800.0, 1500.0)])
def test_the_fit_recovers_a_known_map(b_values) -> None:
    rng = np.random.default_rng(0)
    adc_map = rng.uniform(0.3, 3.0, (6, 7, 8))
    s0 = rng.uniform(500.0, 2000.0, adc_map.shape)
    fitted = fit_adc(_signals(adc_map, s0, b_values))
    assert np.abs(fitted - adc_map).max() < 1e-4


def test_two_b_values_give_the_log_ratio() -> None:
    low, high = np.full((2, 2, 2), 900.0), np.full((2, 2, 2), 300.0)
    expected = np.log(900.0 / 300.0) / (1000.0 - 50.0) / 1e-3
    assert fit_adc({1000.0: high, 50.0: low}) == pytest.approx(np.full((2, 2, 2), expected))


def test_background_is_zero_and_values_are_clipped() -> None:
    s0 = np.full((4, 4, 4), 1000.0)
    s0[0] = 1.0  # air: below 5% of the lowest b-value's 99th percentile
    adc_map = np.full(s0.shape, 1.0)
    adc_map[1] = 9.0  # beyond the physical range (noise)
    fitted = fit_adc(_signals(adc_map, s0, (50.0, 1000.0)))
    assert np.all(fitted[0] == 0.0)
    assert np.all(fitted[1] == ADC_MAX)
    assert fitted[2:] == pytest.approx(np.ones((2, 4, 4)), abs=1e-4)


def test_the_fit_keeps_the_station_grid() -> None:
    images = {}
    for b, value in ((50.0, 800.0), (1000.0, 200.0)):
        image = sitk.GetImageFromArray(np.full((3, 4, 5), value, np.float32))
        image.SetSpacing((2.0, 2.5, 6.0))
        image.SetOrigin((1.0, 2.0, 3.0))
        images[b] = image
    adc = adc_image(images)
    assert adc.GetSpacing() == (2.0, 2.5, 6.0) and adc.GetOrigin() == (1.0, 2.0, 3.0)
    assert sitk.GetArrayViewFromImage(adc)[1, 1, 1] == pytest.approx(np.log(4.0) / 0.95)


def _body_with_bias(shape=(24, 48, 48)):
    """A homogeneous ellipsoid 'body' of 100 under a smooth multiplicative field."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 <= 1.0
    field = np.exp(0.4 * x + 0.25 * y)
    noise = np.random.default_rng(1).normal(0, 1.0, shape)
    return np.where(body, 100.0, 2.0) * field + noise, body, field


def test_n4_flattens_a_smooth_field_and_keeps_the_b_value_ratio() -> None:
    image, body, _ = _body_with_bias()
    low = sitk.GetImageFromArray(image.astype(np.float32))
    low.SetSpacing((3.0, 3.0, 6.0))
    high = sitk.GetImageFromArray((image * 0.25).astype(np.float32))
    high.CopyInformation(low)
    log_field = bias.estimate_log_field(low)
    assert log_field is not None
    corrected_low = sitk.GetArrayFromImage(bias.divide_field(low, log_field))
    corrected_high = sitk.GetArrayFromImage(bias.divide_field(high, log_field))
    inner = body & (np.abs(image) > 20)

    def spread(values: np.ndarray) -> float:
        return float(np.std(values) / np.mean(values))

    assert spread(corrected_low[inner]) < 0.4 * spread(image[inner])
    # one field for the station: the ratio between b-values (hence the ADC) is untouched
    ratio = corrected_high[inner] / corrected_low[inner]
    assert np.abs(ratio - 0.25).max() < 1e-5


def test_n4_leaves_an_empty_station_alone() -> None:
    empty = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    assert bias.estimate_log_field(empty) is None
