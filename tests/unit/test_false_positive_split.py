"""Where false positives lie (evaluation/false_positives.py) on a hand-made 12^3 case.

The rules, read from the code and checked here:

- a predicted component touching any reference-lesion voxel is a true positive and gets no row;
- a false positive is *inside bone* when strictly more than half of its voxels are bone
  (``bone.mean() > 0.5``): exactly half is *outside bone*;
- bone is the tissue map's bone group (``tissues.json``'s ``"bone"``: cortex, marrow, an in-bone
  lesion, ...) when the case has a tissue map, else the reference skeleton (``skeletonTr``, any
  non-zero voxel), else the case is *not assessed* (its counts are NaN);
- the tissue is the single most frequent tissue value among the component's voxels: it can
  disagree with the location (a component mostly bone but split between cortex and marrow can
  have fat as its most frequent tissue).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sap_lightning import synthetic as ph
from sap_lightning.evaluation.false_positives import (
    IN_BONE,
    NOT_ASSESSED,
    OUTSIDE_BONE,
    BoneReference,
    counts_by_location,
    false_positive_table,
)
from sap_lightning.evaluation.predictions import evaluate_predictions, write_evaluation
from sap_lightning.evaluation.report import compare_runs, load_evaluation, render_markdown
from tests.datasets import affine_for, save

T = ph.Tissue
SHAPE = (12, 12, 12)
AFFINE = affine_for((1.0, 1.0, 1.0))


def _worked_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tissue map, label, prediction) of the worked case; axes (x, y, z).

    Tissue: fat everywhere, marrow for x < 4, cortex on the planes x = 4 and 5 (bone is x < 6),
    a lymph node at x 8-10, y 1-2, z 1, the lesion (in-bone metastasis) at x, y, z 1-2, and
    one muscle voxel at (7, 10, 4). Predicted components (6-connected, none touching another):

    ====  ==========================  ======  ===========================  ============  ==========
    name  voxels                      size    tissues                      bone share    expected
    ====  ==========================  ======  ===========================  ============  ==========
    TP    x 1-2, y 1-2, z 1-3         12      lesion 8, marrow 4           touches GT    no row
    A     x 1-2, y 6-7, z 1-2         8       marrow 8                     8/8           in, marrow
    B     x 8-10, y 1-2, z 1          6       lymph node 6                 0/6           out, node
    C     x 2-8, y 10, z 1            7       marrow 2, cortex 2, fat 3    4/7 > 1/2     in, fat
    D     x 4-7, y 10, z 4            4       cortex 2, fat 1, muscle 1    2/4 = 1/2     out, cortex
    E     (10, 6, 10)                 1       fat 1                        0/1           out, fat
    ====  ==========================  ======  ===========================  ============  ==========

    So 5 false positives: 2 inside bone (A, C), 3 outside (B, D, E).
    """
    tissue = np.full(SHAPE, T.FAT, np.uint8)
    tissue[:4] = T.MARROW
    tissue[4:6] = T.CORTEX
    tissue[8:11, 1:3, 1:2] = T.LYMPH_NODE
    tissue[1:3, 1:3, 1:3] = T.LESION
    tissue[7, 10, 4] = T.MUSCLE
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:3, 1:3] = 1
    pred = np.zeros(SHAPE, bool)
    pred[1:3, 1:3, 1:4] = True  # TP
    pred[1:3, 6:8, 1:3] = True  # A
    pred[8:11, 1:3, 1:2] = True  # B
    pred[2:9, 10, 1] = True  # C
    pred[4:8, 10, 4] = True  # D
    pred[10, 6, 10] = True  # E
    return tissue, label, pred


EXPECTED_WORKED = {  # size -> (location, tissue), derived by hand in _worked_case's table
    8: (IN_BONE, "marrow"),
    6: (OUTSIDE_BONE, "lymph_node"),
    7: (IN_BONE, "fat"),
    4: (OUTSIDE_BONE, "cortex"),
    1: (OUTSIDE_BONE, "fat"),
}


def _skeleton_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(skeleton reference, label, prediction): skeleton for x < 6 (regions 1 and 3), the lesion
    at x, y, z 1-2; false positives F (x 2-3, y 8, z 8: in, 2/2 on the skeleton), G (x 9-10,
    y 8, z 8: out, 0/2) and H (x 4-7, y 4, z 10: 2/4 on it, exactly half: out)."""
    skeleton = np.zeros(SHAPE, np.uint8)
    skeleton[:3] = 1
    skeleton[3:6] = 3
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:3, 1:3] = 1
    pred = np.zeros(SHAPE, bool)
    pred[1:3, 1:3, 1:3] = True  # TP
    pred[2:4, 8, 8] = True  # F
    pred[9:11, 8, 8] = True  # G
    pred[4:8, 4, 10] = True  # H
    return skeleton, label, pred


def _write_legend(root: Path) -> None:
    path = root / ph.TISSUES_DIR / ph.TISSUES_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ph.tissue_legend()))


def _by_size(table: pd.DataFrame) -> dict[int, tuple[str, str]]:
    return {int(r.voxels): (r.location, r.tissue) for r in table.itertuples()}


def test_phantom_legend_groups_cortex_marrow_and_lesion_as_bone_but_not_fat_or_nodes() -> None:
    """The worked example relies on these memberships of the synthetic cohort's legend."""
    legend = ph.tissue_legend()
    for tissue in (T.CORTEX, T.MARROW, T.LESION):
        assert int(tissue) in legend["bone"]
    for tissue in (T.FAT, T.MUSCLE, T.LYMPH_NODE, T.LESION_EXTENSION):
        assert int(tissue) not in legend["bone"]


def test_each_false_positive_gets_its_hand_derived_location_and_tissue(tmp_path: Path) -> None:
    """The worked case's five false positives (not the true positive) with their sizes,
    locations (strict bone majority; exactly half is outside) and majority tissues."""
    tissue, label, pred = _worked_case()
    _write_legend(tmp_path)
    save(ph.tissue_path(tmp_path, "p1"), tissue, AFFINE)
    table = false_positive_table(pred, label, "p1", BoneReference(tmp_path))
    assert list(table.columns) == ["case_id", "component", "voxels", "location", "tissue"]
    assert len(table) == 5 and set(table["case_id"]) == {"p1"}
    assert _by_size(table) == EXPECTED_WORKED
    assert table["component"].is_unique
    counts = counts_by_location(table, ["p1"])
    assert counts.to_dict("records") == [
        {"case_id": "p1", "n_fp_in_bone": 2.0, "n_fp_outside_bone": 3.0}
    ]


def test_the_reference_skeleton_stands_in_for_a_missing_tissue_map(tmp_path: Path) -> None:
    """A case without a tissue map (even in a dataset with a legend) is located with its
    ``skeletonTr`` reference (non-zero = bone) and gets no tissue name; a case with neither is
    not assessed and its counts are NaN, while a case without false positives counts 0."""
    _write_legend(tmp_path)
    skeleton, label, pred = _skeleton_case()
    save(tmp_path / "skeletonTr" / "p2.nii.gz", skeleton, AFFINE)
    reference = BoneReference(tmp_path)
    located = false_positive_table(pred, label, "p2", reference)
    assert sorted((int(r.voxels), r.location) for r in located.itertuples()) == [
        (2, IN_BONE),
        (2, OUTSIDE_BONE),
        (4, OUTSIDE_BONE),
    ]
    assert set(located["tissue"]) == {""}
    unknown = false_positive_table(pred, label, "p3", reference)  # no map, no skeleton
    assert len(unknown) == 3 and set(unknown["location"]) == {NOT_ASSESSED}
    clean = false_positive_table(label > 0, label, "p4", reference)  # the lesion alone: a TP
    assert clean.empty
    counts = counts_by_location(pd.concat([located, unknown, clean]), ["p2", "p3", "p4"])
    rows = counts.set_index("case_id")
    assert tuple(rows.loc["p2"]) == (1.0, 2.0)
    assert all(math.isnan(v) for v in rows.loc["p3"])
    assert tuple(rows.loc["p4"]) == (0.0, 0.0)


def test_a_bone_reference_of_another_shape_is_refused(tmp_path: Path) -> None:
    """Locating components against a tissue map of another grid would be meaningless."""
    tissue, label, pred = _worked_case()
    _write_legend(tmp_path)
    save(ph.tissue_path(tmp_path, "p1"), tissue[:, :, :10], AFFINE)
    with pytest.raises(ValueError, match="shape"):
        false_positive_table(pred, label, "p1", BoneReference(tmp_path))


@pytest.fixture
def evaluated(tmp_path: Path) -> Path:
    """``evaluate_predictions`` + ``write_evaluation`` on three binary-mask cases: p1 the worked
    case (tissue map), p2 the skeleton case (no tissue map), p3 the skeleton case's prediction
    without any bone reference."""
    dataset, predictions = tmp_path / "ds", tmp_path / "pred"
    _write_legend(dataset)
    tissue, label1, pred1 = _worked_case()
    save(ph.tissue_path(dataset, "p1"), tissue, AFFINE)
    skeleton, label2, pred2 = _skeleton_case()
    save(dataset / "skeletonTr" / "p2.nii.gz", skeleton, AFFINE)
    for case_id, label, pred in (("p1", label1, pred1), ("p2", label2, pred2), ("p3", label2, pred2)):  # fmt: skip
        save(dataset / "labelsTr" / f"{case_id}.nii.gz", label, AFFINE)
        save(predictions / f"{case_id}.nii.gz", pred.astype(np.uint8), AFFINE)
    evaluation = evaluate_predictions(predictions, dataset, ["p1", "p2", "p3"])
    write_evaluation(evaluation, tmp_path / "eval")
    return tmp_path / "eval"


def test_evaluate_writes_the_split_per_case_and_per_component(evaluated: Path) -> None:
    """cases.csv: p1 2 in / 3 out (hand-derived), p2 1 in / 2 out, p3 not assessed (empty
    cells); its n_fp is the sum where assessed. false_positives.csv lists every component."""
    cases = pd.read_csv(evaluated / "cases.csv", dtype={"case_id": str}).set_index("case_id")
    assert tuple(cases.loc["p1", ["n_fp_in_bone", "n_fp_outside_bone", "n_fp"]]) == (2, 3, 5)
    assert tuple(cases.loc["p2", ["n_fp_in_bone", "n_fp_outside_bone", "n_fp"]]) == (1, 2, 3)
    assert cases.loc["p3", ["n_fp_in_bone", "n_fp_outside_bone"]].isna().all()
    assert cases.loc["p3", "n_fp"] == 3
    located = pd.read_csv(
        evaluated / "false_positives.csv", dtype={"case_id": str}, na_filter=False
    )
    assert _by_size(located[located["case_id"] == "p1"]) == EXPECTED_WORKED
    assert located.groupby("case_id").size().to_dict() == {"p1": 5, "p2": 3, "p3": 3}
    assert set(located.loc[located["case_id"] == "p3", "location"]) == {NOT_ASSESSED}


def test_study_report_rows_and_tissue_table_count_the_same_components(evaluated: Path) -> None:
    """The report's per-exam rows are medians over patients with a lesion where assessed
    (in bone: median(2, 1) = 1.5, outside: median(3, 2) = 2.5; p3 is left out), and its tissue
    table counts p1's false positives by majority tissue: fat 2, marrow, lymph node, cortex 1
    (p2's and p3's, without a tissue map, have no tissue and no row)."""
    run = load_evaluation(evaluated, name="arm")
    text = render_markdown(compare_runs([run], n_resamples=20), n_resamples=20)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    assert lines["FP per exam inside bone (median)"].split("|")[2].strip().startswith("1.500 ")
    assert lines["FP per exam outside bone (median)"].split("|")[2].strip().startswith("2.500 ")
    section = text.split("## False positives by tissue", 1)[1]
    counts = {
        cells[1].strip(): int(cells[2])
        for cells in (line.split("|") for line in section.splitlines() if line.startswith("| "))
        if cells[1].strip() != "tissue"
    }
    assert counts == {"fat": 2, "marrow": 1, "lymph_node": 1, "cortex": 1}
