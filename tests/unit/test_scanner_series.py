"""Series to stations: roles, derived frames, slice order, duplicates, gaps, repeated stations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sap_lightning.core.errors import DatasetError
from sap_lightning.scanner.dicom_files import SliceHeader
from sap_lightning.scanner.series import (
    assign_roles,
    drop_derived,
    group_series,
    resolve_repeats,
    split_stacks,
    stations_of,
)

ROOT = Path("/exams")
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


def _slice(
    name: str,
    offset: float,
    uid: str = "1.1",
    description: str = "T1",
    b: float | None = None,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY"),
    orientation=AXIAL,
    time: str = "20260101100000.000000",
    instance: int = 1,
    origin=(-100.0, -80.0, 0.0),
) -> SliceHeader:
    """A slice ``offset`` mm along the normal from ``origin``."""
    row, column = (np.asarray(v) for v in orientation)
    position = np.asarray(origin) + offset * np.cross(row, column)
    return SliceHeader(
        path=ROOT / "case" / name,
        series_uid=uid,
        series_description=description,
        series_number=int(uid.split(".")[-1]),
        series_time=time,
        instance_number=instance,
        position=tuple(float(v) for v in position),  # type: ignore[arg-type]
        row_cosine=orientation[0],
        column_cosine=orientation[1],
        pixel_spacing=(1.5, 1.0),
        rows=8,
        columns=10,
        slice_thickness=5.0,
        image_type=image_type,
        b_value=b,
        b_value_tag=None if b is None else "(0018,9087)",
        diffusion_directionality=None,
        frame_of_reference="9.9",
        manufacturer="",
    )


def _stack(slices, dwi=False):
    (series,) = group_series(slices)
    stacks, _ = split_stacks("case", series, ROOT, dwi)
    return stacks


def test_slices_are_sorted_by_position_along_the_normal_not_by_name_or_instance() -> None:
    offsets = [20.0, 0.0, 15.0, 5.0, 10.0]
    # names and instance numbers say the opposite of the positions
    slices = [
        _slice(f"IM{9 - i}", z, instance=100 - int(z), orientation=CORONAL)
        for i, z in enumerate(offsets)
    ]
    (stack,) = _stack(slices)
    assert list(stack.positions - stack.positions[0]) == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert stack.step == pytest.approx(5.0)
    # coronal: the normal is posterior (+y in LPS); the stack runs along it
    assert np.allclose(stack.direction[:, 2], [0.0, 1.0, 0.0])
    assert stack.spacing == (1.0, 1.5, pytest.approx(5.0))  # columns, rows, slices


def test_two_slices_at_one_position_are_refused_naming_both_files() -> None:
    slices = [_slice(f"f{i}", z) for i, z in enumerate([0.0, 5.0, 5.0, 10.0])]
    with pytest.raises(DatasetError) as err:
        _stack(slices)
    message = str(err.value)
    assert message.startswith("case case: series 1.1 (T1): ")
    assert "case/f1 and case/f2 lie at the same position" in message
    assert "\n" not in message


def test_a_missing_slice_is_a_recorded_gap() -> None:
    slices = [_slice(f"f{i}", z) for i, z in enumerate([0.0, 5.0, 15.0, 20.0, 25.0])]
    (stack,) = _stack(slices)
    assert stack.n_slices == 6 and list(stack.index) == [0, 1, 3, 4, 5]
    assert stack.gaps == [
        {
            "after_file": "case/f1",
            "missing_slices": 1,
            "position_mm": [10.0],
            "filled": "linear interpolation between the neighbouring slices",
        }
    ]


def test_wide_gaps_and_irregular_steps_are_refused() -> None:
    wide = [_slice(f"f{i}", z) for i, z in enumerate([0.0, 5.0, 10.0, 30.0, 35.0, 40.0])]
    with pytest.raises(DatasetError, match="3 slices missing between case/f2 and case/f3"):
        _stack(wide)
    odd = [_slice(f"f{i}", z) for i, z in enumerate([0.0, 5.0, 10.0, 17.5, 22.5, 27.5])]
    with pytest.raises(DatasetError, match=r"slice step 7.500 mm is not a multiple of the regular"):
        _stack(odd)


def test_b_values_of_one_series_are_split_into_stacks_of_one_station() -> None:
    slices = [
        _slice(f"b{b}_{z}", z, b=b, description="DWI") for b in (50.0, 1000.0) for z in (0, 6, 12)
    ]
    stacks = _stack(slices, dwi=True)
    assert [s.b_value for s in stacks] == [50.0, 1000.0]
    assert all(len(s.slices) == 3 for s in stacks)
    (station,) = stations_of("case", stacks, ROOT)
    assert sorted(station.stacks) == [50.0, 1000.0] and station.reference.b_value == 50.0


def test_two_stations_in_one_series_are_split_by_in_plane_position() -> None:
    slices = [_slice(f"a{z}", z) for z in (0, 5, 10)] + [
        _slice(f"b{z}", z, origin=(-100.0, -80.0 + 300.0, 0.0)) for z in (0, 5, 10)
    ]
    assert len(_stack(slices)) == 2


def test_appended_derived_frames_are_dropped_and_a_derived_only_series_is_kept() -> None:
    acquired = [_slice(f"o{z}", z, b=1000.0) for z in (0, 5, 10)]
    appended = [
        _slice(f"d{z}", z, b=1000.0, image_type=("DERIVED", "PRIMARY", "DIFFUSION"))
        for z in (0, 5, 10)
    ]
    adc_map = [_slice(f"m{z}", z, image_type=("DERIVED", "PRIMARY", "ADC")) for z in (0, 5, 10)]
    (series,) = group_series(acquired + appended + adc_map)
    with pytest.raises(DatasetError, match="same position"):  # kept, they collide
        split_stacks("case", series, ROOT, dwi=True)
    dropped = drop_derived(series)
    assert sorted((d["files"], d["reason"].split(" (")[0]) for d in dropped) == [
        (3, "computed map"),
        (3, "derived frames appended to acquired ones"),
    ]
    assert [s.path.name for s in series.slices] == ["o0", "o5", "o10"]
    trace = [
        _slice(f"t{z}", z, b=800.0, image_type=("DERIVED", "PRIMARY", "TRACEW")) for z in (0, 5)
    ]
    (siemens,) = group_series(trace)
    assert drop_derived(siemens) == [] and len(siemens.slices) == 2


def test_roles_follow_b_values_and_the_patterns() -> None:
    t1 = [_slice(f"t{z}", z, uid="1.1", description="t1_tse_tra") for z in (0, 5, 10)]
    stir = [_slice(f"s{z}", z, uid="1.2", description="stir_tra") for z in (0, 5, 10)]
    dwi = [_slice(f"d{z}", z, uid="1.3", description="ep2d_diff", b=50.0) for z in (0, 5, 10)]
    series = group_series(t1 + stir + dwi)
    roles = assign_roles("case", series)
    assert [s.description for s in roles.t1] == ["t1_tse_tra", "stir_tra"]
    assert [s.description for s in roles.dwi] == ["ep2d_diff"]
    roles = assign_roles("case", series, t1="^t1")
    assert [s.description for s in roles.t1] == ["t1_tse_tra"]
    assert roles.ignored[0]["reason"] == "not matching --t1 '^t1'"
    with pytest.raises(DatasetError, match="case case: no DWI series"):
        assign_roles("case", group_series(t1))
    with pytest.raises(DatasetError, match="matches --dwi 'stir' but no file carries a b-value"):
        assign_roles("case", series, dwi="stir")


def _stations(slices, role="T1"):
    stations = []
    for series in group_series(slices):
        stacks, _ = split_stacks("case", series, ROOT, role == "DWI")
        stations += stations_of("case", stacks, ROOT)
    return resolve_repeats("case", role, stations)


def test_a_repeated_station_keeps_the_newest_series() -> None:
    first = [_slice(f"a{z}", z, uid="1.1", time="20260101100000.000000") for z in (0, 5, 10)]
    again = [_slice(f"b{z}", z, uid="1.2", time="20260101103000.000000") for z in (0, 5, 10)]
    other = [_slice(f"c{z}", z + 12, uid="1.3", origin=(-100, -80, 300)) for z in (0, 5, 10)]
    kept, dropped = _stations(again + first + other)
    assert sorted(s.series.uid for s in kept) == ["1.2", "1.3"]
    assert [d["uid"] for d in dropped] == ["1.1"]
    assert "repeated T1 station: 1.2 is newer" in dropped[0]["reason"]


def test_two_contrasts_at_one_station_cannot_be_told_apart() -> None:
    t1 = [_slice(f"a{z}", z, uid="1.1", description="t1") for z in (0, 5, 10)]
    stir = [_slice(f"b{z}", z, uid="1.2", description="stir") for z in (0, 5, 10)]
    with pytest.raises(DatasetError, match=r"cover the same station: .*pass --t1 REGEX"):
        _stations(t1 + stir)
    same_time = [replace(s, series_number=1) for s in stir]
    with pytest.raises(DatasetError, match="same SeriesTime and number"):
        _stations(t1 + [replace(s, series_description="t1") for s in same_time])
