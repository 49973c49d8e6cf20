"""Where each false positive lies: inside bone or outside it, and in which tissue.

SAP's claim is anatomical: a network that knows where bone is should make fewer false positives
outside it, and may make more inside it (the paper's SAP did, on healed fractures and treated
foci). A false positive is a predicted component that touches no reference lesion (the
evaluation's any-overlap rule); it lies where most of its voxels lie. Bone comes from the
dataset's tissue map when it has one (the synthetic cohort's ``tissuesTr``, every bone, ribs
and skull included), else from its reference skeleton (``skeletonTr``, the nine labelled
regions: ribs count as outside there), else it is not assessed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from sap_lightning.core.io import read_json
from sap_lightning.core.lesions import component_boxes, connected_components
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_image
from sap_lightning.synthetic import TISSUES_DIR, TISSUES_JSON, tissue_path

IN_BONE = "inside bone"
OUTSIDE_BONE = "outside bone"
NOT_ASSESSED = "not assessed"
COLUMNS = ("case_id", "component", "voxels", "location", "tissue")


class BoneReference:
    """A dataset's way of telling bone: tissue maps, else reference skeletons, else nothing."""

    def __init__(self, dataset_dir: str | os.PathLike) -> None:
        self.root = Path(dataset_dir)
        legend_path = self.root / TISSUES_DIR / TISSUES_JSON
        self.legend = read_json(legend_path) if legend_path.is_file() else None

    def maps(self, case_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(bone mask, tissue map) of a case in its files' voxel order; None where absent."""
        if self.legend is not None and tissue_path(self.root, case_id).is_file():
            tissue = np.asarray(read_image(tissue_path(self.root, case_id)).data).astype(np.int64)
            return np.isin(tissue, self.legend["bone"]), tissue
        skeleton = layout.skeleton_reference_path(self.root, case_id)
        if skeleton.is_file():
            return np.asarray(read_image(skeleton).data) > 0, None
        return None, None

    def tissue_name(self, value: int) -> str:
        assert self.legend is not None
        return str(self.legend["values"].get(str(int(value)), value))


def false_positive_table(
    prediction: np.ndarray,
    label: np.ndarray,
    case_id: str,
    reference: BoneReference,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> pd.DataFrame:
    """One row per false-positive component of a binary ``prediction`` against ``label`` (both
    in the files' voxel order): its size, where it lies and its majority tissue."""
    components, count = connected_components(prediction, connectivity)
    bone, tissue = reference.maps(case_id) if count else (None, None)
    for name, array in (("bone", bone), ("tissue map", tissue)):
        if array is not None and array.shape != prediction.shape:
            raise ValueError(
                f"case {case_id}: {name} of shape {array.shape}, not {prediction.shape}"
            )
    lesion = np.asarray(label) > 0
    rows = []
    for component, box in enumerate(component_boxes(components, count), start=1):
        inside = components[box] == component
        if lesion[box][inside].any():
            continue  # touches a reference lesion: a true positive
        location, majority = NOT_ASSESSED, ""
        if bone is not None:
            location = IN_BONE if bone[box][inside].mean() > 0.5 else OUTSIDE_BONE
        if tissue is not None:
            value = Counter(tissue[box][inside].tolist()).most_common(1)[0][0]
            majority = reference.tissue_name(value)
        rows.append((case_id, component, int(inside.sum()), location, majority))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def counts_by_location(table: pd.DataFrame, case_ids: list[str]) -> pd.DataFrame:
    """Per case: false positives inside and outside bone (``n_fp_in_bone``,
    ``n_fp_outside_bone``; NaN where bone was not assessed)."""
    counts = pd.DataFrame({"case_id": case_ids})
    for column, location in (("n_fp_in_bone", IN_BONE), ("n_fp_outside_bone", OUTSIDE_BONE)):
        found = table[table["location"] == location].groupby("case_id").size()
        counts[column] = counts["case_id"].map(found).fillna(0).astype(float)
    assessed = table.groupby("case_id")["location"].apply(lambda s: (s != NOT_ASSESSED).all())
    unknown = counts["case_id"].map(assessed).eq(False)
    counts.loc[unknown, ["n_fp_in_bone", "n_fp_outside_bone"]] = np.nan
    return counts
