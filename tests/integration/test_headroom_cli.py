"""``sap headroom`` through the real command line on a tiny cohort, checked against an
independent recomputation of one case (nibabel, numpy percentiles, scipy components)."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning import synthetic as ph
from sap_lightning.cache.normalize import compute_body_mask
from sap_lightning.cli import main
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout

TINY = ["--shape", "64", "64", "128", "--spacing", "4.5", "4.5", "9"]


@pytest.fixture(scope="module")
def headroom(tmp_path_factory):
    out = tmp_path_factory.mktemp("headroom")
    args = ["headroom", "--generate", str(out), "--mimics", "0", "2", "--healthy", "1"]
    assert main([*args, "--patients", "6", "--seed", "2", *TINY]) == 0
    return out, read_json(out / "headroom.json")


def _normalise(path) -> np.ndarray:
    image = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    low, high = np.percentile(image, [1, 99])
    return (np.clip(image, low, high) - low) / (high - low)


def _recompute(dataset, case_id, b1000_min, t1_max, bone_only, ignore=None):
    """F2, sensitivity, false positives, their tissues and how many of them lie in bone, from
    scratch; voxels labelled ``ignore`` are background in both the rule and the reference
    (nnU-Net's rule). A false positive lies in bone when strictly more than half of its voxels
    are bone (the tissue map's bone group): headroom.score's ``bone_votes * 2 > sizes``, the
    rule of evaluation/false_positives.py too; exactly half is outside."""
    t1 = _normalise(layout.image_path(dataset, case_id, 0))
    b1000 = _normalise(layout.image_path(dataset, case_id, 1))
    values = np.asarray(nib.load(layout.label_path(dataset, case_id)).dataobj)
    label = (values > 0) & (values != ignore)
    tissue = np.asarray(nib.load(ph.tissue_path(dataset, case_id)).dataobj)
    legend = read_json(dataset / ph.TISSUES_DIR / ph.TISSUES_JSON)
    pred = (b1000 > b1000_min) & (t1 < t1_max)
    if bone_only:
        pred &= np.isin(tissue, legend["bone"])
    else:  # the body mask is the library's (what the study masks with)
        affine = layout.affine_from_spacing((4.5, 4.5, 9.0))
        pred &= compute_body_mask(np.stack([t1, b1000]).astype(np.float32), affine)
    pred &= values != ignore
    face = ndimage.generate_binary_structure(3, 1)
    gt, n_gt = ndimage.label(label, face)
    comps, n_pred = ndimage.label(pred, face)
    detected = len(set(np.unique(gt[pred & label]).tolist()) - {0})
    hit = set(np.unique(comps[pred & label]).tolist()) - {0}
    fp_ids = [i for i in range(1, n_pred + 1) if i not in hit]
    names = legend["values"]
    bone = np.isin(tissue, legend["bone"])
    tissues: dict[str, int] = {}
    in_bone = 0
    for i in fp_ids:
        value = int(np.bincount(tissue[comps == i], minlength=256).argmax())
        tissues[names[str(value)]] = tissues.get(names[str(value)], 0) + 1
        in_bone += int(np.count_nonzero(bone[comps == i]) * 2 > np.count_nonzero(comps == i))
    recall = detected / n_gt if n_gt else 1.0
    precision = len(hit) / n_pred if n_pred else 1.0
    f2 = 0.0 if recall == precision == 0 else 5 * precision * recall / (4 * precision + recall)
    return f2, (detected / n_gt if n_gt else math.nan), len(fp_ids), tissues, in_bone


def test_headroom_writes_a_table_per_knob_and_rule(headroom):
    out, result = headroom
    text = (out / "headroom.md").read_text()
    assert result["fixed_rule"] == [0.9, 0.25]
    assert [r["mimics"] for r in result["results"]] == [0.0, 2.0]
    for entry in result["results"]:
        assert len(entry["tuning_cases"]) == 2 and len(entry["test_cases"]) == 4
        rows = entry["rows"]
        assert [(r["rule"], r["bone_mask"]) for r in rows] == [
            ("fixed", False),
            ("tuned", False),
            ("fixed", True),
            ("tuned", True),
        ]
        for row in rows:
            assert row["n_cases"] == 4 and set(row["cases"]) == set(entry["test_cases"])
            per_exam = sum(row["fp_by_tissue"].values())
            assert per_exam == pytest.approx(row["mean_fp"])
        assert entry["lesion_cnr"]["n"] >= 6
    assert text.count("| 0 | ") == 4 and text.count("| 2 | ") == 4
    # At knob 0 no false positive can be a mimic.
    zero = result["results"][0]
    mimic_names = set(ph.tissue_legend()["mimics"])
    assert not any(set(r["fp_by_tissue"]) & mimic_names for r in zero["rows"])


def test_headroom_values_match_an_independent_recomputation(headroom):
    """Every test case of the knob-2 cohort under every row, recomputed from scratch: scores,
    false positives by tissue and how many lie in bone; the rows' mean in / outside bone per
    exam are the recomputed counts' means. The split is exercised: without the bone mask some
    false positives lie in bone and some outside."""
    out, result = headroom
    entry = result["results"][1]
    dataset = out / "mimics_2" / "lesion"
    rows = entry["rows"]
    # A case where the loosest row finds false positives, so the check is not vacuous.
    case_id = max(entry["test_cases"], key=lambda c: rows[1]["cases"][c]["fp"])
    assert rows[1]["cases"][case_id]["fp"] > 0
    split = {False: [0, 0], True: [0, 0]}  # bone mask -> [in bone, outside], summed over rows
    for row in rows:
        in_bone, outside = [], []
        for case in entry["test_cases"]:
            f2, sensitivity, fp, tissues, fp_in_bone = _recompute(
                dataset, case, row["b1000_min"], row["t1_max"], row["bone_mask"]
            )
            got = row["cases"][case]
            assert got["fp"] == fp, (row["rule"], case)
            assert got["f2"] == pytest.approx(f2, abs=1e-9)
            assert got["sensitivity"] == pytest.approx(sensitivity, nan_ok=True)
            assert got["fp_by_tissue"] == tissues
            assert got["fp_in_bone"] == fp_in_bone, (row["rule"], row["bone_mask"], case)
            in_bone.append(fp_in_bone)
            outside.append(fp - fp_in_bone)
        assert row["mean_fp_in_bone"] == pytest.approx(np.mean(in_bone))
        assert row["mean_fp_outside_bone"] == pytest.approx(np.mean(outside))
        split[row["bone_mask"]][0] += sum(in_bone)
        split[row["bone_mask"]][1] += sum(outside)
    assert split[False][0] > 0 and split[False][1] > 0, split
    assert split[True][0] > 0 and split[True][1] == 0, split  # the mask keeps only bone


def test_headroom_leaves_the_ignore_label_out(headroom, tmp_path):
    """A slab nobody annotated (nnU-Net's ``ignore``) over half of one case: the rule's
    components and the lesions there count neither as found, missed nor false."""
    out, result = headroom
    dataset = tmp_path / "lesion"
    shutil.copytree(out / "mimics_2" / "lesion", dataset)
    spec = read_json(dataset / "dataset.json")
    spec["labels"]["ignore"] = max(spec["labels"].values()) + 1
    (dataset / "dataset.json").write_text(json.dumps(spec))
    entry = result["results"][1]
    rows = entry["rows"]
    case_id = max(entry["test_cases"], key=lambda c: rows[1]["cases"][c]["fp"])
    path = layout.label_path(dataset, case_id)
    image = nib.load(path)
    values = np.asarray(image.dataobj).astype(np.uint8)
    values[:, :, values.shape[2] // 2 :] = spec["labels"]["ignore"]
    nib.save(nib.Nifti1Image(values, image.affine), path)
    assert main(["headroom", str(dataset), "--out", str(tmp_path / "report")]) == 0
    again = read_json(tmp_path / "report" / "headroom.json")["results"][0]["rows"]
    for row in again:
        f2, sensitivity, fp, tissues, fp_in_bone = _recompute(
            dataset, case_id, row["b1000_min"], row["t1_max"], row["bone_mask"],
            ignore=spec["labels"]["ignore"],
        )  # fmt: skip
        got = row["cases"][case_id]
        assert got["fp"] == fp and got["fp_by_tissue"] == tissues, row["rule"]
        assert got["fp_in_bone"] == fp_in_bone, row["rule"]
        assert got["f2"] == pytest.approx(f2, abs=1e-9)
        assert got["sensitivity"] == pytest.approx(sensitivity, nan_ok=True)
    assert again[1]["cases"][case_id]["fp"] < rows[1]["cases"][case_id]["fp"]


def test_headroom_reuses_a_matching_cohort_and_reads_given_datasets(headroom, tmp_path, capsys):
    out, _ = headroom
    args = ["headroom", "--generate", str(out), "--mimics", "0", "--healthy", "1"]
    assert main([*args, "--patients", "6", "--seed", "2", *TINY]) == 0
    assert "reusing the cohort" in capsys.readouterr().out
    dataset = out / "mimics_0" / "lesion"
    assert main(["headroom", str(dataset), "--out", str(tmp_path)]) == 0
    again = read_json(tmp_path / "headroom.json")["results"][0]
    first = read_json(out / "headroom.json")["results"][0]
    assert again["rows"] == first["rows"]


def test_headroom_needs_datasets_or_generate(tmp_path, capsys):
    assert main(["headroom", "--out", str(tmp_path)]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main(["headroom", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
