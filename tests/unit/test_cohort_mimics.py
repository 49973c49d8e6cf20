"""The cohort of docs/cohort.md: mimics at their prevalence and place, the knob, labels, sites,
tissue maps.

Rates are checked twice: the counts the generator draws (thousands of draws, no rendering) and
the mimics it actually places on rendered cases (tiny grid).
"""

from __future__ import annotations

import collections
import json

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning import synthetic as ph
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout
from sap_lightning.dataset.validate import check_dataset
from sap_lightning.synthetic import mimic_table as mt

TINY_SHAPE, TINY_SPACING = ph.SIZES["tiny"]
CUBE = np.ones((3, 3, 3), bool)


def _counts(kind: ph.MimicKind, cohort: str, mimics: float, n: int = 3000) -> np.ndarray:
    return np.array(
        [ph.sample_count(np.random.default_rng([7, i]), kind, cohort, mimics) for i in range(n)]
    )


@pytest.mark.parametrize("kind", ph.MIMIC_KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("cohort", ["healthy", "patients"])
def test_counts_follow_the_table_and_the_knob(kind, cohort):
    """Mean count per scan = knob x the table's expected count (Poisson, within 4 standard
    errors, capped at the structure's sites); organs present with probability min(1, knob)."""
    expected = kind.expected[mt.COHORTS.index(cohort)]
    for knob in (0.0, 0.5, 1.0, 2.0):
        counts = _counts(kind, cohort, knob)
        if knob == 0 or expected == 0:
            assert not counts.any()
            continue
        if kind.organ:
            present = np.mean(counts > 0)
            assert set(np.unique(counts)) <= {0, len(kind.sides)}
            assert present == pytest.approx(min(1.0, knob * expected), abs=0.04)
            continue
        mean = knob * expected
        if kind.cap is not None:
            assert counts.max() <= kind.cap
            draws = np.random.default_rng(0).poisson(mean, 200_000)
            mean = float(np.minimum(draws, kind.cap).mean())
        assert counts.mean() == pytest.approx(mean, abs=4 * np.sqrt(mean / len(counts)) + 1e-9)


@pytest.mark.parametrize("kind", [k for k in ph.MIMIC_KINDS if k.sites], ids=lambda k: k.name)
def test_planned_sites_follow_the_tables_weights(kind):
    """Over 4000 planned instances each site's share is its weight in docs/cohort.md (the page's
    numbers are the generator's: test_cohort_table.py), within 4 binomial standard errors."""
    from sap_lightning.synthetic.mimics import _plan_kind

    def group(site: str) -> str:  # the table's site of a planned one
        if kind.name == "fracture":  # a vertebra of T10-L2, or one sacral ala
            return "vertebral" if site in mt.FRACTURE_VERTEBRAE else site.split(":")[0]
        return next(key for key in kind.sites if site in (key, key.split(":")[-1]))

    n = 4000
    plans = _plan_kind(np.random.default_rng(5), kind, n)
    planned = collections.Counter(group(p.site) for p in plans)
    total = sum(kind.sites.values())
    for site, weight in kind.sites.items():
        share = weight / total
        drawn = planned[site]
        assert drawn / n == pytest.approx(share, abs=4 * np.sqrt(share * (1 - share) / n)), site


def test_knob_two_draws_twice_the_counted_mimics_and_zero_none():
    totals = {}
    for knob in (0.0, 1.0, 2.0):
        plans = [ph.plan_mimics([3, 6, i], "patients", knob) for i in range(150)]
        counted = [p for plan in plans for p in plan if not mt.MIMIC_BY_NAME[p.kind].organ]
        totals[knob] = len(counted)
        if knob == 0:
            assert not any(plans)
    assert totals[2.0] / totals[1.0] == pytest.approx(2.0, rel=0.05)


def test_a_larger_knob_keeps_the_smaller_knobs_mimics():
    one = ph.plan_mimics([0, 6, 4], "patients", 1.0)
    two = ph.plan_mimics([0, 6, 4], "patients", 2.0)
    for kind in ph.MIMIC_KINDS:
        a = [p for p in one if p.kind == kind.name]
        b = [p for p in two if p.kind == kind.name]
        assert b[: len(a)] == a, kind.name
        assert len(b) >= len(a)


def test_healthy_volunteers_have_no_disease_mimics():
    for kind in ("marrow_reconversion", "treated_metastasis", "nodal_metastasis"):
        assert mt.MIMIC_BY_NAME[kind].expected[0] == 0
        plans = [ph.plan_mimics([0, 5, v], "healthy", 3.0) for v in range(50)]
        assert not any(p.kind == kind for plan in plans for p in plan)


@pytest.fixture(scope="module")
def rendered() -> list[ph.PhantomCase]:
    """Six patients and three healthy scans on the tiny grid at knob 2 (rare mimics appear)."""
    patients = [ph.generate_patient_case(11, i, TINY_SHAPE, TINY_SPACING, 2.0) for i in range(6)]
    healthy = [ph.generate_healthy_case(11, i, TINY_SHAPE, TINY_SPACING, 2.0) for i in range(3)]
    return patients + healthy


def test_rendered_cases_hold_their_planned_mimics(rendered):
    """Nearly every planned mimic is placed (counts per scan as the table says)."""
    planned, placed = collections.Counter(), collections.Counter()
    for case in rendered:
        cohort = "patients" if case.case_id.startswith("patient") else "healthy"
        stream = 6 if cohort == "patients" else 5
        subject = int(case.subject_id.split("_")[1])
        plan = ph.plan_mimics([11, stream, subject], cohort, 2.0)
        planned.update(p.kind for p in plan)
        placed.update(m.kind for m in case.mimics)
    assert sum(placed.values()) >= 0.97 * sum(planned.values())
    for kind, n in planned.items():
        assert placed[kind] >= 0.75 * n, (kind, placed[kind], n)
    per_scan = {k: placed[k] / len(rendered) for k in ("lymph_node", "dorsal_root_ganglion")}
    assert per_scan["lymph_node"] == pytest.approx(2 * 53, rel=0.15)
    assert per_scan["dorsal_root_ganglion"] == pytest.approx(2 * 20, rel=0.15)


def test_mimics_sit_where_the_table_says(rendered):
    """In-bone mimics are bone (and stay in the skeleton map), the others never are; ganglia
    touch bone, nodes may, about half the nodal metastases do; organs are present."""
    touching = collections.defaultdict(list)
    for case in rendered:
        skeleton_before = case.maps.region
        near_bone = ndimage.binary_dilation(case.maps.bone, CUBE)
        for mimic in case.mimics:
            kind = mt.MIMIC_BY_NAME[mimic.kind]
            voxels = case.mimic_ids == mimic.index
            assert voxels.sum() == mimic.voxels >= 1
            assert (case.maps.tissue[voxels] == kind.tissue).all()
            if kind.in_bone:
                assert (skeleton_before[voxels] > 0).all(), mimic
            else:
                assert not (skeleton_before[voxels] > 0).any(), mimic
                assert mimic.touches_bone == bool(near_bone[voxels].any())
                touching[mimic.kind].append(mimic.touches_bone)
        organs = {m.kind for m in case.mimics if mt.MIMIC_BY_NAME[m.kind].organ}
        assert organs == {k.name for k in ph.MIMIC_KINDS if k.organ}, case.case_id
    assert np.mean(touching["dorsal_root_ganglion"]) >= 0.95
    assert 0.05 <= np.mean(touching["lymph_node"]) <= 0.6
    assert 0.3 <= np.mean(touching["nodal_metastasis"]) <= 0.9


def test_mimics_are_never_labelled_and_lesions_stay_separate(rendered):
    for case in rendered:
        label = case.lesion_mask > 0
        assert not (label & (case.mimic_ids > 0)).any()
        assert not (ndimage.binary_dilation(label, CUBE) & (case.mimic_ids > 0)).any()
        assert not np.isin(case.maps.tissue[label], ph.MIMIC_TISSUES).any()
        assert np.array_equal(label, np.isin(case.maps.tissue, ph.LESION_TISSUES))
        _, n = cc3d.connected_components(label, connectivity=6, return_N=True)
        assert n == len(case.lesions)
        if case.case_id.startswith("patient"):
            assert len(case.lesions) >= 1


def test_knob_zero_draws_no_mimic_and_leaves_the_rest_of_the_case_alone():
    """The same patient at knob 0 and 1: no mimic at 0; the same body, lesions and noise, so
    images differ only next to the mimics (the point-spread reaches two voxels)."""
    zero = ph.generate_patient_case(4, 1, TINY_SHAPE, TINY_SPACING, 0.0)
    one = ph.generate_patient_case(4, 1, TINY_SHAPE, TINY_SPACING, 1.0)
    assert not zero.mimics and not np.isin(zero.maps.tissue, ph.MIMIC_TISSUES).any()
    assert len(one.mimics) > 50
    assert np.array_equal(zero.lesion_ids, one.lesion_ids)
    assert zero.lesions == one.lesions
    far = ~ndimage.binary_dilation(one.mimic_ids > 0, CUBE, iterations=3)
    assert np.array_equal(zero.t1[far], one.t1[far])
    assert np.array_equal(zero.b1000[far], one.b1000[far])
    assert not np.array_equal(zero.b1000, one.b1000)


def test_a_volunteers_mimics_are_the_same_in_each_scan():
    repeated = next(
        [i for i in range(12) if ph.volunteer_of_scan(0, i)[0] == v]
        for v in range(12)
        if sum(ph.volunteer_of_scan(0, i)[0] == v for i in range(12)) >= 2
    )
    first, second = (ph.generate_healthy_case(0, i, TINY_SHAPE, TINY_SPACING) for i in repeated[:2])
    assert first.pose != second.pose and first.site == second.site
    a = sorted((m.kind, m.site, m.t1, m.b1000) for m in first.mimics)
    b = sorted((m.kind, m.site, m.t1, m.b1000) for m in second.mimics)
    assert a == b


def test_sites_volunteers_at_three_patients_at_one():
    volunteers = [ph.volunteer_of_scan(0, i)[0] for i in range(12)]
    healthy = [ph.generate_healthy_case(0, i, TINY_SHAPE, TINY_SPACING, 0.0) for i in (0, 1)]
    for index, case in zip((0, 1), healthy):
        assert case.site == ph.volunteer_site(volunteers[index])
    assert {ph.volunteer_site(v) for v in range(6)} == {0, 1, 2}
    patient = ph.generate_patient_case(0, 0, TINY_SHAPE, TINY_SPACING, 0.0)
    assert patient.site == ph.PATIENT_SITE == 0
    # The noise in the air follows the site's b1000 noise (Rician floor: sigma x sqrt(pi / 2)),
    # within the per-scan spread of gain (0.85-1.15) and noise (0.8-1.25).
    for case in [*healthy, patient]:
        site = ph.SITES[case.site]
        air = ndimage.binary_erosion(case.maps.tissue == ph.Tissue.AIR, CUBE, iterations=3)
        floor = case.b1000[air].mean() / (ph.CHANNEL_SCALE[1] * np.sqrt(np.pi / 2))
        assert 0.8 * 0.85 * site.noise[1] * site.gain[1] <= floor
        assert floor <= 1.25 * 1.15 * site.noise[1] * site.gain[1] * 1.1


def test_tissue_maps_are_written_named_and_the_datasets_stay_valid(tmp_path):
    paths = ph.make_phantom_cohort(
        tmp_path / "c", 2, 2, seed=3, shape=TINY_SHAPE, spacing=TINY_SPACING, mimics=0.5
    )
    affine = layout.affine_from_spacing(TINY_SPACING)
    for dataset in (paths.skeleton, paths.lesion):
        legend = read_json(dataset / ph.TISSUES_DIR / ph.TISSUES_JSON)
        assert legend == json.loads(json.dumps(ph.tissue_legend()))
        assert legend["values"]["21"] == "dorsal_root_ganglion"
        assert legend["mimics"]["lymph_node"] == int(ph.Tissue.LYMPH_NODE)
        spec = read_json(dataset / layout.DATASET_JSON)
        assert spec["phantom"]["mimics"] == 0.5
        for case in spec["subjects"]:
            image = nib.load(ph.tissue_path(dataset, case))
            assert image.get_data_dtype() == np.uint8 and image.shape == TINY_SHAPE
            np.testing.assert_allclose(image.affine, affine)
            tissue = np.asarray(image.dataobj)
            assert set(np.unique(tissue).tolist()) <= {int(v) for v in legend["values"]}
            counts = collections.Counter()
            for value in np.unique(tissue):
                name = legend["values"][str(int(value))]
                if name in legend["mimics"]:
                    counts[name] += 1
            assert set(counts) <= set(spec["phantom"]["mimic_counts"][case])
            if dataset == paths.lesion:
                label = np.asarray(nib.load(layout.label_path(dataset, case)).dataobj) > 0
                assert np.array_equal(label, np.isin(tissue, legend["metastasis"]))
        assert check_dataset(dataset, use_cache=False) == []


def test_a_share_of_large_lesions_extends_into_soft_tissue():
    """About 15% of the lesions of >= 1 mL grow through the cortex (docs/cohort.md 1.1): placed
    in one patient's skeleton, 60 lesions of 1.1 mL, each extension 20-60% of its bone part."""
    shape, spacing = ph.SIZES["small"]
    anatomy = ph.patient_anatomy(0, 0, ph.fov_of(shape, spacing))
    rng = np.random.default_rng(5)
    maps = ph.render_anatomy(anatomy, ph.sample_scan_pose(rng, anatomy), shape, spacing)
    ids, lesions = ph.place_lesions(rng, maps, spacing, [1.1] * 60)
    assert len(lesions) >= 55
    extended = [les for les in lesions if les.extension_ml > 0]
    assert 0.05 <= len(extended) / len(lesions) <= 0.3, len(extended)
    for les in extended:
        bone_part = les.volume_ml - les.extension_ml
        assert 0.15 * bone_part <= les.extension_ml <= 0.65 * bone_part, les
    outside = maps.tissue == ph.Tissue.LESION_EXTENSION
    assert not maps.bone[outside].any() and (ids[outside] > 0).all()
    _, n = cc3d.connected_components(ids > 0, connectivity=6, return_N=True)
    assert n == len(lesions)
