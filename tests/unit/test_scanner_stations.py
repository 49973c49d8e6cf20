"""Composing stations: the output grid, world-space resampling of oblique stations, the linear
ramp across an overlap and the centre-out intensity standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from sap_lightning.scanner.stations import (
    compose,
    output_grid,
    place,
    ramp_weights,
    resample_intensities,
    resample_onto,
    stacking_direction,
    standardisation_factors,
    station_order,
)

GRADIENT = np.array([0.3, -0.2, 0.5])


def _rotation(degrees: float) -> np.ndarray:
    """About the (1, 1, 0) axis: oblique in every plane."""
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _station(origin, direction, size=(20, 18, 12), spacing=(2.0, 2.0, 4.0), value=None):
    """A station whose voxels hold f(world) = GRADIENT . world + 100 (or a constant)."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).flatten()))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[
        ..., ::-1
    ]  # (z, y, x, [x, y, z])
    world = index * np.asarray(spacing) @ np.asarray(direction).T + np.asarray(origin)
    values = world @ GRADIENT + 100.0 if value is None else np.full(size[::-1], value)
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    return out


def _world_of_grid(grid) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size[::-1]], indexing="ij"), -1)
    return index[..., ::-1] * np.asarray(grid.spacing) @ grid.matrix.T + np.asarray(grid.origin)


def _compose(stations, factors=True):
    grid = output_grid(stations)
    direction = stacking_direction(stations)
    order = station_order(stations, direction)
    placed = [place(grid, stations[i], ramp_weights(stations[i], direction)) for i in order]
    found, pairs = standardisation_factors(placed)
    return grid, compose(grid, placed, found if factors else None), found, pairs, placed


def test_oblique_stations_compose_to_the_world_function() -> None:
    rotation = _rotation(12.0)
    step = rotation @ np.array([0.0, 0.0, 4.0 * 9])  # the second station starts 9 slices on
    first = _station([-20.0, -10.0, 5.0], rotation)
    second = _station(np.array([-20.0, -10.0, 5.0]) + step, rotation)
    grid, out, factors, _, placed = _compose([first, second])
    assert np.allclose(grid.matrix, rotation, atol=1e-6)
    assert grid.size == (20, 18, 21)  # 12 + 12 slices, 3 shared
    covered = np.zeros(out.shape, bool)
    for station in placed:
        covered[station.slices()] |= station.weights > 0
    interior = np.zeros(out.shape, bool)
    interior[1:-1, 1:-1, 1:-1] = True
    expected = _world_of_grid(grid) @ GRADIENT + 100.0
    assert factors == pytest.approx([1.0, 1.0], abs=1e-4)
    assert np.abs(out - expected)[covered & interior].max() < 1e-3


def test_a_station_on_another_lattice_is_resampled_in_world_space() -> None:
    fine = _station([0.0, 0.0, 0.0], np.eye(3), size=(24, 20, 10), spacing=(1.5, 1.5, 3.0))
    rotation = _rotation(-8.0)
    coarse = _station([0.0, 0.0, 24.0], rotation, size=(12, 10, 10), spacing=(3.0, 3.0, 4.0))
    grid, out, _, _, placed = _compose([fine, coarse])
    assert grid.spacing == (1.5, 1.5, 3.0) and np.allclose(grid.matrix, np.eye(3))
    # the grid keeps the finest station's lattice: its first voxel is one of the grid's voxels
    index = np.asarray(grid.reference().TransformPhysicalPointToContinuousIndex(fine.GetOrigin()))
    assert np.allclose(index, np.rint(index), atol=1e-6)
    world = _world_of_grid(grid)
    expected = world @ GRADIENT + 100.0
    # voxels inside a station's voxel centres and outside every station's half-voxel rim,
    # where the resampler can only repeat border values
    inside, rim = np.zeros(out.shape, bool), np.zeros(out.shape, bool)
    for station in (fine, coarse):
        direction = np.asarray(station.GetDirection()).reshape(3, 3)
        index = (world - station.GetOrigin()) @ direction / station.GetSpacing()
        size = np.asarray(station.GetSize())
        within = np.all((index >= 0) & (index <= size - 1), axis=-1)
        inside |= within
        rim |= np.all((index >= -0.5) & (index <= size - 0.5), axis=-1) & ~within
    valid = inside & ~rim
    assert valid.sum() > 3000 and placed[0] is not None
    assert np.abs(out - expected)[valid].max() < 1e-3


def test_weights_ramp_linearly_across_the_overlap() -> None:
    low = _station([0.0, 0.0, 0.0], np.eye(3), value=1.0)
    high = _station([0.0, 0.0, 4.0 * 8], np.eye(3), value=3.0)  # slices 8-11 of low are shared
    _, out, _, _, _ = _compose([low, high], factors=False)
    profile = out[:, 5, 5]
    assert np.allclose(profile[:8], 1.0) and np.allclose(profile[12:], 3.0)
    # inside the overlap the blend moves by equal steps from one station to the other
    ramp = profile[7:13]
    assert np.all(np.diff(ramp) > 0)
    assert np.allclose(np.diff(profile[8:12]), np.diff(profile[8:12])[0], atol=1e-5)
    assert profile[8:12].mean() == pytest.approx(2.0, abs=1e-5)


def test_standardisation_goes_from_the_centre_station_outwards() -> None:
    gains = [0.8, 1.25, 1.0, 0.7, 1.2]
    stations = []
    for k, gain in enumerate(gains):
        image = _station([0.0, 0.0, 4.0 * 9 * k], np.eye(3))
        stations.append(sitk.Cast(image * gain, sitk.sitkFloat32))
    grid, out, factors, pairs, _ = _compose(stations)
    # each factor undoes its station's gain relative to the centre station's (gain 1.0)
    assert [f * g for f, g in zip(factors, gains)] == pytest.approx([1.0] * 5, rel=1e-4)
    assert [p["station"] for p in pairs] == [3, 4, 1, 0]
    expected = _world_of_grid(grid) @ GRADIENT + 100.0
    inner = np.s_[1:-1, 1:-1, 1:-1]
    assert np.abs(out[inner] / expected[inner] - 1).max() < 1e-4


def test_a_station_order_follows_the_stacking_direction_whatever_the_input_order() -> None:
    stations = [_station([0.0, 0.0, z], np.eye(3)) for z in (80.0, 0.0, 40.0)]
    direction = stacking_direction(stations)
    assert abs(direction @ [0.0, 0.0, 1.0]) == pytest.approx(1.0)
    order = station_order(stations, direction)
    assert order in ([1, 2, 0], [0, 2, 1])


def test_affine_maps_grid_voxels_to_ras() -> None:
    coronal = np.column_stack([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # LPS columns
    station = _station([10.0, 20.0, 30.0], coronal)
    grid = output_grid([station])
    point = np.array([3, 4, 5, 1.0])
    lps = np.asarray(station.TransformIndexToPhysicalPoint([3, 4, 5]))
    assert np.allclose(grid.affine_ras() @ point, [-lps[0], -lps[1], lps[2], 1.0])


def test_spline_resampling_keeps_a_sharp_edge_non_negative() -> None:
    """A bright block in air, on a coarse station, resampled onto a grid twice as fine: the
    cubic spline undershoots beside the edge, the magnitudes it returns do not."""
    fine = _station([0.0, 0.0, 0.0], np.eye(3), size=(24, 24, 12), spacing=(1.0, 1.0, 2.0))
    block = np.zeros((6, 12, 12), np.float32)
    block[2:4, 4:8, 4:8] = 100.0
    coarse = sitk.GetImageFromArray(block)
    coarse.SetSpacing((2.0, 2.0, 4.0))
    grid = output_grid([fine])
    undershoot = resample_onto(grid, coarse, interpolator=sitk.sitkBSpline)
    values = resample_intensities(grid, coarse)
    assert undershoot.min() < -1.0  # what the clip is for
    assert values.min() == 0.0
    # at the coarse voxel centres the spline interpolates: the block's own values come back
    assert values[4, 8:16:2, 8:16:2] == pytest.approx(100.0, abs=0.5)
