"""The case picture shows what it claims: each lesion in its colour where its projection is, in
the radiological orientation and physical aspect, whatever the input's voxel order.

Expectations are computed here from the test case's own affine (world mm of each lesion, the
field of view's edges), never from the picture's geometry; only where the panels lie in the
image (their pixel boxes) is read from the picture.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from sap_lightning.inference.pictures import (
    FALSE_NEGATIVE_COLOUR,
    FALSE_POSITIVE_COLOUR,
    LESION_COLOURS,
    MIN_OUTLINE_MM,
    OTHER_BONE_COLOUR,
    OUTLINE_MARGIN_MM,
    REGION_COLOURS,
    TRUE_POSITIVE_COLOUR,
    CasePicture,
    draw_case,
)
from sap_lightning.metrics.functional import lesion_detection

SHAPE = (40, 30, 60)
SPACING = (2.0, 3.0, 5.0)
ORIGIN = (-40.0, -45.0, -150.0)
TOLERANCE = 30
"""Largest per-channel difference of a pixel that counts as a colour (antialiased line edges
blend into the grey; no grey is this close to any lesion colour)."""

# Voxel boxes (x, y, z slices) in the RAS+ array of the test case; each projects to a different
# place on both panels. Axis 0 runs to the patient's right, 1 to anterior, 2 to the head.
TP_REFERENCE = (slice(8, 12), slice(10, 14), slice(40, 44))
TP_PREDICTION = (slice(9, 13), slice(10, 14), slice(40, 44))  # overlaps the reference lesion
MISSED = (slice(28, 31), slice(18, 21), slice(15, 18))
FALSE_POSITIVE = (slice(20, 23), slice(5, 8), slice(25, 28))
SMALL_FALSE_POSITIVE = (slice(32, 33), slice(24, 25), slice(50, 51))  # one voxel: ringed


def _affine(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _case(seed: int = 0) -> dict[str, np.ndarray]:
    """A RAS+ case: an elliptic body, bright lesions, a skeleton map with three regions."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij", sparse=True)
    body = (grid[0] / 0.8) ** 2 + (grid[1] / 0.8) ** 2 <= 1.0
    b1000 = np.where(body, 40.0, 5.0) + rng.normal(0, 2, SHAPE)
    reference = np.zeros(SHAPE, np.uint8)
    prediction = np.zeros(SHAPE, np.uint8)
    for box in (TP_REFERENCE, MISSED):
        reference[box] = 1
    for box in (TP_PREDICTION, FALSE_POSITIVE, SMALL_FALSE_POSITIVE):
        prediction[box] = 1
    b1000[(reference > 0) | (prediction > 0)] = 200.0
    skeleton = np.zeros(SHAPE, np.uint8)
    skeleton[6:14, 8:16, 38:46] = 2  # thoracic spine around the TP
    skeleton[18:25, 3:10, 23:30] = 4  # pelvis around the false positive
    skeleton[26:33, 16:23, 13:20] = 5  # femur around the missed lesion
    t1 = np.where(body, 100.0, 3.0) + rng.normal(0, 2, SHAPE)
    return {
        "image": np.stack([t1, b1000]).astype(np.float32),
        "reference": reference,
        "prediction": prediction,
        "skeleton": skeleton,
    }


def _world(box: tuple[slice, slice, slice], affine: np.ndarray) -> np.ndarray:
    """World (mm) centroid of a voxel box: the affine applied to its mean voxel index."""
    centre = np.array([(s.start + s.stop - 1) / 2 for s in box])
    return affine[:3, :3] @ centre + affine[:3, 3]


def _edges(affine: np.ndarray, axis: int) -> tuple[float, float]:
    """The field of view along a RAS+ axis: first voxel's lower edge, last voxel's upper edge."""
    step = affine[axis, axis]
    first = affine[axis, 3]
    return first - step / 2, first + (SHAPE[axis] - 0.5) * step


def _expected_pixel(picture: CasePicture, panel: str, world: np.ndarray) -> tuple[float, float]:
    """Row and column of a world point: radiological convention (patient's right and anterior
    on the viewer's left, head up) inside the panel's pixel box."""
    affine = _affine()
    horizontal = 0 if panel == "coronal" else 1
    low, high = _edges(affine, horizontal)
    bottom, top = _edges(affine, 2)
    row0, col0, row1, col1 = picture.panels[panel].box
    column = col0 + (high - world[horizontal]) / (high - low) * (col1 - col0)
    row = row0 + (top - world[2]) / (top - bottom) * (row1 - row0)
    return row, column


def _colours(
    rgb: np.ndarray, palette: tuple[tuple[int, int, int], ...] = LESION_COLOURS
) -> np.ndarray:
    """Per pixel, the index in ``palette`` of the colour it is within :data:`TOLERANCE` of and
    nearest to (-1: none). A picture's own palette: an antialiased line over a dark lesion
    darkens towards other hues of the whole set (vermillion over black nears humeri brown)."""
    pixels = rgb.astype(np.int16)
    distance = np.stack([np.abs(pixels - np.array(c, np.int16)).max(axis=-1) for c in palette])
    nearest = distance.argmin(axis=0)
    return np.where(distance.min(axis=0) <= TOLERANCE, nearest, -1)


def _inside(picture: CasePicture, panel: str) -> np.ndarray:
    row0, col0, row1, col1 = picture.panels[panel].box
    mask = np.zeros(picture.rgb.shape[:2], bool)
    mask[int(row0) : int(np.ceil(row1)), int(col0) : int(np.ceil(col1))] = True
    return mask


def _reach_px(picture: CasePicture, panel: str, box: tuple[slice, slice, slice]) -> float:
    """How far from the centroid its outline (or ring) may run, in pixels."""
    row0, _, row1, _ = picture.panels[panel].box
    px_per_mm = (row1 - row0) / (SHAPE[2] * SPACING[2])
    horizontal = 0 if panel == "coronal" else 1
    half = max(
        (box[a].stop - box[a].start) * SPACING[a] / 2 for a in (horizontal, 2)
    )  # footprint half extent
    reach_mm = max(half + OUTLINE_MARGIN_MM, MIN_OUTLINE_MM / 2)
    return reach_mm * px_per_mm + 3


def _near(mask: np.ndarray, pixel: tuple[float, float], reach: float) -> np.ndarray:
    rows, cols = np.indices(mask.shape)
    return mask & (np.abs(rows - pixel[0]) <= reach) & (np.abs(cols - pixel[1]) <= reach)


def _check_colours_at(
    picture: CasePicture, expected: dict[tuple[int, int, int], list[tuple[slice, slice, slice]]]
) -> None:
    """Each colour of the picture is drawn around each of its lesions on both panels and nowhere
    else in them (the picture's colours are those of its legend)."""
    affine = _affine()
    palette = tuple(expected)
    assert {entry.colour for entry in picture.legend if entry.count} == set(palette)
    classes = _colours(picture.rgb, palette)
    for panel in ("coronal", "sagittal"):
        inside = _inside(picture, panel)
        for index, (colour, boxes) in enumerate(expected.items()):
            found = (classes == index) & inside
            explained = np.zeros_like(found)
            for box in boxes:
                pixel = _expected_pixel(picture, panel, _world(box, affine))
                near = _near(found, pixel, _reach_px(picture, panel, box))
                assert near.sum() >= 8, f"{colour} missing around {box} on the {panel} panel"
                explained |= near
                # The outline runs outside the lesion: its own (inverted, bright) signal shows.
                centre = picture.rgb[int(pixel[0]), int(pixel[1])].astype(int)
                assert centre.max() < 90 and np.ptp(centre) <= 10, (panel, box, centre)
            assert not (found & ~explained).any(), f"{colour} drawn elsewhere on the {panel} panel"


def test_true_false_positives_and_misses_are_drawn_in_their_colours_where_they_are(
    tmp_path,
) -> None:
    case = _case()
    path = tmp_path / "pictures" / "case.png"
    picture = draw_case(
        case["image"],
        _affine(),
        prediction=case["prediction"],
        reference=case["reference"],
        skeleton=case["skeleton"],
        path=path,
        title="case",
    )
    _check_colours_at(
        picture,
        {
            TRUE_POSITIVE_COLOUR: [TP_PREDICTION],
            FALSE_POSITIVE_COLOUR: [FALSE_POSITIVE, SMALL_FALSE_POSITIVE],
            FALSE_NEGATIVE_COLOUR: [MISSED],
        },
    )
    # The file holds exactly the returned pixels; no temporary file is left behind.
    written = imread(path)
    assert np.array_equal(np.rint(written[..., :3] * 255).astype(np.uint8), picture.rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.png"]
    # Inverted grey: the air in the panel's corner is white.
    row0, col0, _, _ = picture.panels["coronal"].box
    assert (picture.rgb[int(row0) + 2, int(col0) + 2] >= 240).all()
    # The drawing's own positions agree with the panel geometry and the independent mapping.
    for lesion in picture.lesions:
        for panel in ("coronal", "sagittal"):
            expected = _expected_pixel(picture, panel, np.array(lesion.centroid_mm))
            assert np.allclose(lesion.pixels[panel], expected, atol=0.5)
            assert np.allclose(picture.panels[panel].to_pixel(lesion.centroid_mm), expected)
    assert [lesion.ringed for lesion in picture.lesions if lesion.voxels == 1] == [True]
    assert not any(lesion.ringed for lesion in picture.lesions if lesion.voxels > 1)


def test_legend_counts_are_the_evaluations_detection_counts() -> None:
    case = _case()
    picture = draw_case(
        case["image"], _affine(), prediction=case["prediction"], reference=case["reference"]
    )
    library = lesion_detection(case["prediction"], case["reference"], SPACING)
    assert (library.n_detected, library.n_false_positive, library.n_missed) == (1, 2, 1)
    assert picture.detection == library
    counts = {entry.colour: entry.count for entry in picture.legend}
    assert counts == {
        TRUE_POSITIVE_COLOUR: library.n_detected,
        FALSE_POSITIVE_COLOUR: library.n_false_positive,
        FALSE_NEGATIVE_COLOUR: library.n_missed,
    }
    drawn = {
        colour: sum(lesion.colour == colour for lesion in picture.lesions) for colour in counts
    }
    assert drawn == {
        TRUE_POSITIVE_COLOUR: library.n_pred_matched,
        FALSE_POSITIVE_COLOUR: library.n_false_positive,
        FALSE_NEGATIVE_COLOUR: library.n_missed,
    }
    # The legend's text says the same numbers.
    labels = " | ".join(entry.label for entry in picture.legend)
    assert "1 of 2 lesions found" in labels and "false positive: 2" in labels
    assert "1 missed" in labels


def test_a_prediction_alone_is_coloured_by_skeletal_region_with_counts_and_volumes() -> None:
    case = _case()
    picture = draw_case(
        case["image"][1], _affine(), prediction=case["prediction"], skeleton=case["skeleton"]
    )
    _check_colours_at(
        picture,
        {
            REGION_COLOURS[2]: [TP_PREDICTION],
            REGION_COLOURS[4]: [FALSE_POSITIVE],
            OTHER_BONE_COLOUR: [SMALL_FALSE_POSITIVE],
        },
    )
    voxel_ml = np.prod(SPACING) / 1000
    legend = {entry.label.split(":")[0]: entry for entry in picture.legend}
    assert list(legend) == ["thoracic spine", "pelvis", "other bone"]  # head to feet
    assert legend["thoracic spine"].count == 1
    assert legend["thoracic spine"].volume_ml == pytest.approx(4 * 4 * 4 * voxel_ml)
    assert legend["pelvis"].volume_ml == pytest.approx(27 * voxel_ml)
    assert legend["other bone"].volume_ml == pytest.approx(voxel_ml)
    assert "0.81 mL" in legend["pelvis"].label  # 27 voxels of 0.03 mL
    assert picture.detection is None


def test_other_voxel_orders_draw_the_same_picture() -> None:
    case = _case()
    affine = _affine()
    reference = draw_case(
        case["image"],
        affine,
        prediction=case["prediction"],
        reference=case["reference"],
        skeleton=case["skeleton"],
    )
    # LPS: axes 0 and 1 reversed, the affine's columns negated and its origin moved along them.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    # Sagittal-like storage: array axes (z, x, y) with z reversed (superior to inferior).
    permuted = np.zeros((4, 4))
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = -1.0, 1.0, 1.0, 1.0
    permuted[2, 3] = SHAPE[2] - 1
    stores = {
        "LPS": (lambda a: a[..., ::-1, ::-1, :], affine @ lps),
        "SRA": (
            lambda a: np.moveaxis(a, (-1, -3, -2), (-3, -2, -1))[..., ::-1, :, :],
            affine @ permuted,
        ),
    }
    for name, (store, stored_affine) in stores.items():
        # The stored copy maps each voxel to the same world point as the original.
        index = np.array([3, 4, 5])
        stored_index = {"LPS": [SHAPE[0] - 4, SHAPE[1] - 5, 5], "SRA": [SHAPE[2] - 6, 3, 4]}[name]
        assert np.allclose(stored_affine @ [*stored_index, 1], affine @ [*index, 1])
        assert store(case["image"][1])[tuple(stored_index)] == case["image"][1][tuple(index)]
        other = draw_case(
            store(case["image"]),
            stored_affine,
            prediction=store(case["prediction"]),
            reference=store(case["reference"]),
            skeleton=store(case["skeleton"]),
        )
        assert other.rgb.shape == reference.rgb.shape, name
        assert np.array_equal(other.rgb, reference.rgb), name
        assert other.panels == reference.panels
        assert [lesion.kind for lesion in other.lesions] == [
            lesion.kind for lesion in reference.lesions
        ]


@pytest.mark.parametrize("spacing", [(2.0, 3.0, 5.0), (1.0, 1.0, 1.0)])
def test_panels_have_the_physical_aspect_ratio(spacing: tuple[float, float, float]) -> None:
    case = _case()
    picture = draw_case(case["image"], _affine(spacing), panel_height_px=600)
    extent = [n * s for n, s in zip(SHAPE, spacing, strict=True)]
    heights = []
    for panel, horizontal in (("coronal", 0), ("sagittal", 1)):
        row0, col0, row1, col1 = picture.panels[panel].box
        heights.append(row1 - row0)
        assert row1 - row0 == pytest.approx(600, abs=1)
        assert (col1 - col0) / (row1 - row0) == pytest.approx(
            extent[horizontal] / extent[2], abs=1.5 / 600
        )
    assert heights[0] == heights[1]  # the same mm per pixel in both panels
    # The panel's mm edges are the field of view's, the patient's right on the viewer's left.
    coronal = picture.panels["coronal"]
    low, high = ORIGIN[0] - spacing[0] / 2, ORIGIN[0] + (SHAPE[0] - 0.5) * spacing[0]
    assert (coronal.left_mm, coronal.right_mm) == pytest.approx((high, low))


@pytest.mark.parametrize("both", [True, False], ids=["matched", "by_region"])
def test_a_lesion_free_case_draws_no_lesion_colour(both: bool) -> None:
    case = _case()
    empty = np.zeros(SHAPE, np.uint8)
    picture = draw_case(
        case["image"],
        _affine(),
        prediction=empty,
        reference=empty if both else None,
        skeleton=case["skeleton"],
    )
    assert picture.lesions == ()
    classes = _colours(picture.rgb)
    assert not (classes >= 0).any(), sorted({LESION_COLOURS[i] for i in classes[classes >= 0]})
    assert all(entry.count == 0 for entry in picture.legend)
    # The skeleton's outline is drawn (so the check above saw it and did not take it for one).
    assert (picture.rgb.astype(int).max(axis=-1) - picture.rgb.min(axis=-1) > 40).any()


def test_channels_or_b1000_alone_draw_the_same_and_bad_inputs_are_refused() -> None:
    case = _case()
    both = draw_case(case["image"], _affine(), prediction=case["prediction"])
    alone = draw_case(case["image"][1], _affine(), prediction=case["prediction"])
    assert np.array_equal(both.rgb, alone.rgb)
    with pytest.raises(ValueError, match="prediction has shape"):
        draw_case(case["image"], _affine(), prediction=case["prediction"][:-1])
    with pytest.raises(ValueError, match="image must be"):
        draw_case(case["image"][1, 0], _affine())
