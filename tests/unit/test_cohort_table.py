"""docs/cohort.md is the cohort's specification: the numbers in its tables are the generator's.

Each row of the page's tables is read back and compared with the constants the generator
draws from, so the code cannot drift from the page (nor the page from the code).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sap_lightning import synthetic as ph
from sap_lightning.synthetic import mimic_table as mt
from sap_lightning.synthetic import tissues as ts

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cohort.md"

DOC_NAMES = {
    "red_marrow_island": "focal red-marrow island",
    "marrow_reconversion": "patchy marrow reconversion",
    "haemangioma": "lipid-poor vertebral haemangioma",
    "modic_type1": "Modic type 1 / mixed 1-2 endplate change",
    "fracture": "subacute insufficiency fracture",
    "treated_metastasis": "treated (sclerotic) metastasis",
    "bone_island": "bone island (enostosis)",
    "dorsal_root_ganglion": "dorsal root ganglion",
    "lymph_node": "normal lymph node",
    "nodal_metastasis": "nodal metastasis",
    "prostate": "prostate",
    "seminal_vesicle": "seminal vesicles",
    "testis": "testes",
    "parotid": "parotid glands",
    "submandibular": "submandibular glands",
    "tonsil": "palatine tonsils",
    "bright_bowel": "b1000-bright bowel loop",
}
RANGE = r"(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)"


def _rows() -> dict[str, list[str]]:
    """Every table row of the page, keyed by its first cell."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


ROWS = _rows()


def _range(cell: str, suffix: str = "") -> tuple[float, float]:
    found = re.search(r"\(" + RANGE + suffix, cell)
    assert found, cell
    return float(found.group(1)), float(found.group(2))


def _expected(cell: str) -> tuple[float, float]:
    """(healthy, patients) from a prevalence cell."""
    if cell.startswith("present"):
        return 1.0, 1.0
    healthy = re.search(r"healthy (\d+(?:\.\d+)?)", cell)
    patients = re.search(r"patients (\d+(?:\.\d+)?)", cell)
    if healthy and patients:
        return float(healthy.group(1)), float(patients.group(1))
    first = float(re.match(r"(\d+(?:\.\d+)?)", cell).group(1))  # type: ignore[union-attr]
    return first, first


def test_every_mimic_kind_has_one_row_and_every_row_one_kind():
    assert set(DOC_NAMES) == set(mt.MIMIC_BY_NAME)
    assert all(name in ROWS for name in DOC_NAMES.values())


@pytest.mark.parametrize("kind", mt.MIMIC_KINDS, ids=lambda k: k.name)
def test_mimic_row_matches_the_code(kind):
    _, location, size, t1, b1000, prevalence, _source = ROWS[DOC_NAMES[kind.name]]
    assert _range(t1) == pytest.approx(kind.t1)
    if kind.in_bone:
        ratio = tuple(v / ts.RED_MARROW_B1000 for v in kind.b1000)
        assert _range(b1000, r" x marrow") == pytest.approx(ratio)
    else:
        assert _range(b1000) == pytest.approx(kind.b1000)
    assert _expected(prevalence) == pytest.approx(kind.expected)
    if kind.volume_ml is not None:
        found = re.search(RANGE + " mL", size)
        assert found, size
        assert tuple(float(v) for v in found.groups()) == pytest.approx(kind.volume_ml)
    if "as metastases" in location:
        location = ROWS["bone metastasis, viable (80% of lesions)"][1]
    numbers = {float(v) for v in re.findall(r"\b\d\.\d+", location)}
    assert set(kind.sites.values()) <= numbers, (kind.name, location)
    if kind.touching:
        assert "touching" in location
    if kind.cap is not None:
        assert str(kind.cap) in location


SITE_WORDS = {
    "pelvis": "pelvis", "femur_proximal": "proximal femora", "femur": "femora",
    "humerus_proximal": "proximal humeri", "humerus": "humeri", "lumbar": "lumbar",
    "thoracic": "thoracic", "cervical": "cervical", "ribs": "ribs", "scapula": "scapulae",
    "clavicle": "clavicles", "sternum": "sternum", "neck": "neck",
    "supraclavicular": "supraclavicular", "axilla": "axilla", "mediastinum": "mediastinum",
    "para_aortic": "para-aortic", "common_iliac": "common iliac",
    "pelvic_side_wall": "pelvic side wall", "presacral": "presacral", "inguinal": "inguinal",
}  # fmt: skip
"""The page's word for each landmark group the generator weights."""


@pytest.mark.parametrize(
    "kind",
    [k for k in mt.MIMIC_KINDS if k.sites and set(k.sites) <= set(SITE_WORDS)],
    ids=lambda k: k.name,
)
def test_each_site_has_its_own_weight_on_the_page(kind):
    """Each site's weight is the first number after its name in the location cell ("humeri,
    scapulae, sternum 0.04 each" gives all three 0.04), so two sites' weights cannot swap."""
    location = ROWS[DOC_NAMES[kind.name]][1]
    if "as metastases" in location:
        location = ROWS["bone metastasis, viable (80% of lesions)"][1]
    location = location.split("site weights:", 1)[-1]
    for site, weight in kind.sites.items():
        found = re.search(rf"(?<!proximal ){re.escape(SITE_WORDS[site])}\D*?(\d\.\d+)", location)
        assert found, (kind.name, site, location)
        assert float(found.group(1)) == pytest.approx(weight), (kind.name, site)


def test_the_metastases_site_weights_are_the_pages():
    """Lesions are seeded by bone region (``tissues.LESION_SITE_WEIGHTS``); treated metastases
    by landmark group (``mimic_table.LESION_SITES``): both carry the page's weights."""
    by_region = {
        name: ts.LESION_SITE_WEIGHTS[value]
        for name, value in ts.SKELETON_CLASSES.items()
        if value in ts.LESION_SITE_WEIGHTS
    }
    assert by_region == {"cervical_spine": 0.05, "thoracic_spine": 0.20, "lumbar_spine": 0.16,
                         "pelvis": 0.24, "femurs": 0.09, "humeri": 0.04, "scapulae": 0.04,
                         "clavicles": 0.02, "sternum": 0.04}  # fmt: skip
    assert ts.LESION_SITE_WEIGHTS[ts.RIB_REGION] == 0.12
    assert mt.LESION_SITES == {"cervical": 0.05, "thoracic": 0.20, "lumbar": 0.16, "pelvis": 0.24,
                               "femur": 0.09, "humerus": 0.04, "scapula": 0.04, "clavicle": 0.02,
                               "sternum": 0.04, "ribs": 0.12}  # fmt: skip


def test_ganglion_sizes_and_band_numbers():
    size = ROWS[DOC_NAMES["dorsal_root_ganglion"]][2]
    groups = re.findall(r"([CTL]\d+)/\w+(?:-([CTL]\d+)/\w+)? (\d\.\d+)", size)
    assert len(groups) == 6, size
    uppers = [name.split("/")[0] for name in mt.DRG_LEVELS]
    for first, last, volume in groups:
        span = range(uppers.index(first), uppers.index(last or first) + 1)
        assert all(mt.drg_volume_ml(level) == float(volume) for level in span), first
    assert sum(len(range(uppers.index(a), uppers.index(b or a) + 1)) for a, b, _ in groups) == 24
    modic = ROWS[DOC_NAMES["modic_type1"]]
    assert f"{mt.MODIC_PAIRED:g}" in modic[1]
    assert _range(modic[2].replace("3-8 mm", "(3-8 mm")) == mt.MODIC_THICKNESS_MM
    assert "60-100%" in modic[2] and mt.MODIC_COVERAGE == (0.6, 1.0)
    fracture = ROWS[DOC_NAMES["fracture"]]
    assert "5-10 mm" in fracture[2] and mt.FRACTURE_THICKNESS_MM == (5.0, 10.0)
    assert "T10-L2" in fracture[1] and mt.FRACTURE_VERTEBRAE == ("T10", "T11", "T12", "L1", "L2")
    node = ROWS[DOC_NAMES["lymph_node"]][2]
    assert "short axis 3-6 mm" in node and mt.NODE_SHORT_AXIS_MM == (3.0, 6.0)
    assert "1.2-2.0" in node and mt.NODE_ELONGATION == (1.2, 2.0)
    nodal = ROWS[DOC_NAMES["nodal_metastasis"]][2]
    assert "short axis 8-15 mm" in nodal and mt.NODAL_METASTASIS_SHORT_AXIS_MM == (8.0, 15.0)
    assert "1.0-1.5" in nodal and mt.NODAL_METASTASIS_ELONGATION == (1.0, 1.5)


def test_metastasis_rows_match_the_code():
    viable = ROWS["bone metastasis, viable (80% of lesions)"]
    assert _range(viable[3].replace("0.12-0.32:", "(0.12-0.32")) == ts.LESION_T1_RANGE
    assert "1.2-4.0 x red marrow" in viable[4] and ts.LESION_B1000_RATIO == (1.2, 4.0)
    assert "negative binomial (r 0.8, mean 5)" in viable[5]
    assert (ts.LESION_COUNT_SHAPE, ts.LESION_COUNT_EXTRA_MEAN) == (0.8, 5.0)
    assert "median 0.5 mL" in viable[2] and "at most 10 mL" in viable[2]
    assert (ts.LESION_MEDIAN_ML, ts.LESION_MAX_ML) == (0.5, 10.0)
    sclerotic = ROWS["bone metastasis, sclerotic (20% of lesions)"]
    assert ts.SCLEROTIC_SHARE == 0.2
    assert "0.04-0.12" in sclerotic[3] and ts.SCLEROTIC_T1_RANGE == (0.04, 0.12)
    assert "0.6-1.2 x red marrow" in sclerotic[4] and ts.SCLEROTIC_B1000_RATIO == (0.6, 1.2)
    extension = ROWS["soft-tissue extension"]
    assert "15% of lesions" in extension[1] and ts.EXTENSION_SHARE == 0.15
    assert "20-60%" in extension[2] and ts.EXTENSION_FRACTION == (0.2, 0.6)
    text = PAGE.read_text()
    assert "h\n0.10-0.35" in text or "h 0.10-0.35" in text
    assert ts.LESION_TEXTURE == (0.10, 0.35) and ts.LESION_EDGE == (0.5, 0.8)
    assert "50-80% of its contrast" in text


ANATOMY = {
    "fat": [ph.Tissue.FAT],
    "muscle": [ph.Tissue.MUSCLE],
    "red marrow (axial skeleton)": [ph.Tissue.MARROW],
    "cortex (rim voxel, partial volume)": [ph.Tissue.CORTEX],
    "disc": [ph.Tissue.DISC],
    "cerebrospinal fluid": [ph.Tissue.CSF],
    "spinal cord": [ph.Tissue.CORD],
    "brain": [ph.Tissue.BRAIN],
    "spleen": [ph.Tissue.SPLEEN],
    "kidney": [ph.Tissue.KIDNEY],
    "liver": [ph.Tissue.LIVER],
    "urinary bladder": [ph.Tissue.BLADDER],
    "bowel": [ph.Tissue.BOWEL],
    "heart, vessels, lung": [ph.Tissue.HEART, ph.Tissue.VESSEL, ph.Tissue.LUNG],
}


@pytest.mark.parametrize("name", ANATOMY)
def test_anatomy_signals_match_the_page(name):
    _, t1, b1000, _note = ROWS[name]
    t1s = [float(v) for v in t1.split(" / ")]
    b1000s = [float(v) for v in b1000.split(" / ")]
    for tissue, a, b in zip(ANATOMY[name], t1s, b1000s, strict=True):
        assert ph.SIGNAL[tissue] == pytest.approx((a, b)), tissue
    yellow = ROWS["yellow marrow (femora, humeri, distal bones)"]
    assert pytest.approx((float(yellow[1]), float(yellow[2]))) == ph.YELLOW_MARROW_SIGNAL


def test_sites_match_the_page():
    for site in ph.SITES:
        row = ROWS[str(site.index)]
        _, _who, g1, g2, n1, n2, bias, steps = row
        assert site.gain == pytest.approx((float(g1), float(g2)))
        assert site.noise == pytest.approx((float(n1), float(n2)))
        assert site.bias == pytest.approx(float(bias.lstrip("x")))
        assert site.station_sd == pytest.approx(float(steps))
    assert "all patients" in ROWS[str(ph.PATIENT_SITE)][1]
