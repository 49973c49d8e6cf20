"""``sap import-dicom`` through the command line, on synthetic scanner exams of phantom cases.

Every expectation comes from the phantom and from what ``tests/dicom_exams.py`` wrote (gains,
stations, the known ADC map, file names), never from the import itself. ADC values are in
10^-3 mm^2/s, the unit of the ADC channel.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.cli import main
from sap_lightning.dataset.images import read_canonical
from sap_lightning.dataset.layout import affine_from_spacing
from sap_lightning.synthetic import SIZES, PhantomCase, generate_patient_case
from tests.datasets import save, truncate
from tests.dicom_exams import ExamSpec, WrittenExam, known_adc_on_grid, write_dicom_exam

DWI_FWHM = (2.0, 2.0, 1.5)
"""The DWI voxel in T1 voxels (axial exams): the resolution the imported b1000 can have."""


@cache
def phantom(size: str) -> tuple[PhantomCase, np.ndarray]:
    shape, spacing = SIZES[size]
    return generate_patient_case(0, 1, shape, spacing), affine_from_spacing(spacing)


def _exam(root: Path, case_id: str, size: str = "tiny", **spec: object) -> WrittenExam:
    case, affine = phantom(size)
    return write_dicom_exam(
        root / case_id,
        case.t1,
        case.b1000,
        affine,
        ExamSpec(**spec),  # type: ignore[arg-type]
        body=case.maps.tissue > 0,
    )


def _labels(folder: Path, case_id: str, size: str) -> Path:
    case, affine = phantom(size)
    save(folder / f"{case_id}.nii.gz", case.lesion_mask, affine)
    return folder


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    array, affine, _ = read_canonical(path)
    return array, affine


def _world_centroid(mask: np.ndarray, affine: np.ndarray, weights=None) -> np.ndarray:
    index = np.argwhere(mask).astype(float)
    w = np.ones(len(index)) if weights is None else weights[mask]
    centre = (index * w[:, None]).sum(axis=0) / w.sum()
    return affine[:3, :3] @ centre + affine[:3, 3]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One axial exam (small phantom), imported with ADC and labels."""
    root = tmp_path_factory.mktemp("axial")
    exam = _exam(root / "src", "pat1", "small")
    labels = _labels(root / "labels", "pat1", "small")
    out = root / "out"
    assert (
        main(["import-dicom", str(root / "src"), str(out), "--adc", "--labels", str(labels)]) == 0
    )
    return {"root": root, "exam": exam, "out": out}


def test_the_import_is_a_valid_dataset_with_a_manifest(axial, capsys) -> None:
    out = axial["out"]
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1", "1": "b1000", "2": "ADC"}
    assert spec["numTraining"] == 1 and spec["labels"] == {"background": 0, "lesion": 1}
    assert main(["check-data", str(out)]) == 0
    assert "OK: 1 cases" in capsys.readouterr().out
    manifest = json.loads((out / "manifests" / "pat1.json").read_text())
    assert [s["description"] for s in manifest["t1"]["stations"]] == [
        f"T1 station {k}" for k in range(1, 6)
    ]
    assert manifest["dwi"]["b_values"] == [50.0, 1000.0] and manifest["dwi"]["b_value_used"] == 1000
    assert manifest["files"]["not_dicom"] == 2  # README.txt and viewer/settings.ini
    grid = manifest["output_grid"]
    t1, affine = _read(out / "imagesTr" / "pat1_0000.nii.gz")
    assert grid["spacing_mm"] == [3.0, 3.0, 6.0] and t1.shape == phantom("small")[0].t1.shape
    assert np.allclose(affine, phantom("small")[1], atol=1e-4)


def test_t1_and_b1000_match_the_phantom_inside_the_body(axial) -> None:
    case, _ = phantom("small")
    body = case.maps.tissue > 0
    t1, _ = _read(axial["out"] / "imagesTr" / "pat1_0000.nii.gz")
    b1000, _ = _read(axial["out"] / "imagesTr" / "pat1_0001.nii.gz")
    assert _corr(t1[body], case.t1[body]) >= 0.99
    assert _corr(b1000[body], case.b1000[body]) >= 0.95
    # The DWI was written at half the in-plane resolution with 1.5x thicker slices: at that
    # resolution (a Gaussian of the DWI voxel's FWHM) the phantom is matched almost exactly.
    sigma = [w / 2.3548 for w in DWI_FWHM]
    matched = ndimage.gaussian_filter(case.b1000.astype(np.float64), sigma)
    assert _corr(b1000[body], matched[body]) >= 0.99


def test_a_lesion_lands_within_half_a_voxel(axial) -> None:
    case, affine = phantom("small")
    largest = max(
        range(1, int(case.lesion_ids.max()) + 1), key=lambda i: (case.lesion_ids == i).sum()
    )
    lesion = case.lesion_ids == largest
    label, label_affine = _read(axial["out"] / "labelsTr" / "pat1.nii.gz")
    imported = ndimage.label(label > 0)[0]
    found = imported == imported[tuple(np.argwhere(lesion)[0])]
    half = np.asarray(SIZES["small"][1]) / 2
    assert np.all(
        np.abs(_world_centroid(found, label_affine) - _world_centroid(lesion, affine)) < half
    )
    # the bright b1000 blob of the lesion lands there too (the DWI was resampled in world space)
    b1000, b_affine = _read(axial["out"] / "imagesTr" / "pat1_0001.nii.gz")
    # The lesion and two voxels around it: a box would also hold the bright mimics and organs
    # the phantom draws next to bone, whose own blobs would pull the centroid.
    window = ndimage.binary_dilation(lesion, iterations=2)
    centres = []
    for image, aff in ((case.b1000.astype(float), affine), (b1000, b_affine)):
        excess = np.clip(image - np.median(image[window]), 0, None)
        centres.append(_world_centroid(window, aff, excess))
    assert np.all(np.abs(centres[0] - centres[1]) < half)


def test_station_intensities_are_standardised(axial) -> None:
    case, _ = phantom("small")
    exam: WrittenExam = axial["exam"]
    body = case.maps.tissue > 0
    t1, _ = _read(axial["out"] / "imagesTr" / "pat1_0000.nii.gz")
    b1000, _ = _read(axial["out"] / "imagesTr" / "pat1_0001.nii.gz")
    sigma = [w / 2.3548 for w in DWI_FWHM]
    matched = ndimage.gaussian_filter(case.b1000.astype(np.float64), sigma)
    ranges = exam.station_ranges
    for gains in (exam.t1_gains, exam.dwi_gains):  # the raw stations differ by more than 5%
        assert max(abs(a / b - 1) for a, b in zip(gains[1:], gains[:-1])) > 0.1
    for imported, original in ((t1, case.t1), (b1000, matched)):
        ratios = []
        for k, (first, last) in enumerate(ranges):
            # the station's own slices: away from both overlaps
            start = ranges[k - 1][1] + 2 if k else first
            stop = ranges[k + 1][0] - 2 if k + 1 < len(ranges) else last
            core = body[:, :, start : stop + 1]
            ratios.append(
                imported[:, :, start : stop + 1][core].sum()
                / original[:, :, start : stop + 1][core].sum()
            )
        assert max(abs(b / a - 1) for a, b in itertools.pairwise(ratios)) < 0.05
    manifest = json.loads((axial["out"] / "manifests" / "pat1.json").read_text())
    factors = [s["scale_factor"] for s in manifest["t1"]["stations"]]
    products = np.asarray(factors) * exam.t1_gains
    assert np.abs(products / products[2] - 1).max() < 0.01  # the centre station keeps its scale


def test_adc_matches_the_known_map(axial) -> None:
    case, _ = phantom("small")
    adc, affine = _read(axial["out"] / "imagesTr" / "pat1_0002.nii.gz")
    expected = known_adc_on_grid(affine, adc.shape)
    body = case.maps.tissue > 0
    # Where the DWI has signal (fat is suppressed at b1000 and its ADC set to background),
    # two DWI voxels away from its border.
    sigma = [w / 2.3548 for w in DWI_FWHM]
    signal = ndimage.gaussian_filter(case.b1000.astype(np.float64), sigma)
    mask = body & (signal >= 0.1 * np.percentile(signal[body], 99))
    mask = ndimage.binary_erosion(mask, np.ones((3, 3, 3)), iterations=2)
    assert mask.sum() > 0.3 * body.sum()
    assert np.abs(adc - expected)[mask].max() < 1e-3  # 10^-3 mm^2/s
    # air, well away from the body: the same noise at both b-values, no diffusion
    air = ~ndimage.binary_dilation(body, np.ones((3, 3, 3)), iterations=3)
    assert np.percentile(adc[air], 99) < 0.05


@pytest.fixture(scope="module")
def both_orientations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orientations")
    for orientation in ("axial", "coronal"):
        _exam(root / orientation, "pat1", orientation=orientation)
        assert (
            main(["import-dicom", str(root / orientation), str(root / f"{orientation}_out")]) == 0
        )
    return {o: root / f"{o}_out" for o in ("axial", "coronal")}


def test_a_coronal_exam_imports_to_the_same_world_image(both_orientations) -> None:
    case, affine = phantom("tiny")
    t1 = {o: _read(path / "pat1_0000.nii.gz") for o, path in both_orientations.items()}
    coronal = nib.load(both_orientations["coronal"] / "pat1_0000.nii.gz")
    assert nib.aff2axcodes(coronal.affine) == ("L", "I", "P")  # stored in the scanner's order
    assert np.allclose(t1["axial"][1], t1["coronal"][1], atol=1e-4)
    assert np.allclose(t1["coronal"][1], affine, atol=1e-4)
    scale = t1["coronal"][0].sum() / t1["axial"][0].sum()
    assert np.abs(t1["coronal"][0] - scale * t1["axial"][0]).max() <= 1e-3 * t1["axial"][0].max()
    body = case.maps.tissue > 0
    b1000 = _read(both_orientations["coronal"] / "pat1_0001.nii.gz")[0]
    sigma = [DWI_FWHM[0] / 2.3548, DWI_FWHM[2] / 2.3548, DWI_FWHM[1] / 2.3548]  # coronal DWI
    matched = ndimage.gaussian_filter(case.b1000.astype(np.float64), sigma)
    assert _corr(b1000[body], matched[body]) >= 0.98


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_each_vendor_b_value_tag_is_read(tmp_path: Path, vendor: str) -> None:
    _exam(tmp_path / "src", "pat1", vendor=vendor, stations=2, overlap=16)
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    tag = {
        "siemens": "Siemens (0019,100C)",
        "ge": "GE (0043,1039)",
        "philips": "Philips (2001,1003)",
    }
    for station in manifest["dwi"]["stations"]:
        assert station["b_values"] == [50.0, 1000.0]
        assert station["b_value_tags"] == [tag[vendor]]


def test_derived_frames_are_dropped_and_reported(tmp_path: Path) -> None:
    exam = _exam(
        tmp_path / "src", "pat1", vendor="philips", derived_frames=True, stations=2, overlap=16
    )
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    derived = [d for d in manifest["dropped"] if "derived frames" in d["reason"]]
    assert sorted(d["description"] for d in derived) == ["DWI station 1", "DWI station 2"]
    for record in derived:
        # a third of each DWI series: one derived frame per b50 / b1000 slice pair
        assert record["files"] * 3 == len(exam.series[record["description"]])
        assert "DiffusionDirectionality ISOTROPIC" in record["reason"]


def test_duplicate_positions_are_refused_naming_the_files(tmp_path: Path, capsys) -> None:
    exam = _exam(tmp_path / "src", "pat1", duplicate_slice=(1, 5), stations=3)
    out = tmp_path / "out"
    assert main(["import-dicom", str(tmp_path / "src"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sap import-dicom: error: case pat1: series ")
    assert "(T1 station 2)" in err and "lie at the same position" in err
    named = [p for p in exam.series["T1 station 2"] if str(p.relative_to(tmp_path / "src")) in err]
    assert len(named) == 2
    assert not any(out.rglob("pat1*"))


def test_a_missing_slice_is_reported_and_filled(tmp_path: Path) -> None:
    case, _ = phantom("tiny")
    exam = _exam(tmp_path / "src", "pat1", missing_slice=(2, 14))
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    (station,) = [s for s in manifest["t1"]["stations"] if s["gaps"]]
    assert station["description"] == "T1 station 3"
    (gap,) = station["gaps"]
    assert gap["missing_slices"] == 1
    z = exam.station_ranges[2][0] + 14  # the phantom slice left out
    assert gap["position_mm"] == [pytest.approx(z * SIZES["tiny"][1][2], abs=1e-3)]
    t1, _ = _read(tmp_path / "out" / "pat1_0000.nii.gz")
    factor = t1[:, :, z - 3].sum() / case.t1[:, :, z - 3].sum()
    between = (case.t1[:, :, z - 1] + case.t1[:, :, z + 1]) / 2
    assert np.abs(t1[:, :, z] - factor * between).max() < 1e-3 * case.t1.max()


def test_a_repeated_station_keeps_the_newest(tmp_path: Path) -> None:
    case, _ = phantom("tiny")
    _exam(tmp_path / "src", "pat1", repeated_station=1)
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    (dropped,) = [d for d in manifest["dropped"] if "repeated" in d["reason"]]
    assert dropped["description"] == "T1 station 2"
    kept = [s["uid"] for s in manifest["t1"]["stations"]]
    assert dropped["uid"] not in kept and len(kept) == 5
    t1, _ = _read(tmp_path / "out" / "pat1_0000.nii.gz")
    body = case.maps.tissue > 0
    assert _corr(t1[body], case.t1[body]) >= 0.999  # the older one was shifted: not used


def test_a_truncated_file_is_refused_in_one_line_and_nothing_of_its_case_is_written(
    tmp_path: Path,
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _exam(src, "good", stations=2, overlap=16)
    broken = _exam(src, "broken", stations=2, overlap=16)
    victim = broken.series["T1 station 2"][7]
    truncate(victim)
    labels = _labels(tmp_path / "labels", "good", "tiny")
    _labels(labels, "broken", "tiny")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sap_lightning",
            "import-dicom",
            str(src),
            str(out),
            "--labels",
            str(labels),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith("sap import-dicom: error: case broken: ")
    assert "(T1 station 2)" in errors[0] and str(victim.relative_to(src)) in errors[0]
    assert "unreadable pixel data" in errors[0]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "dataset.json",
        "good.json",
        "good.nii.gz",
        "good_0000.nii.gz",
        "good_0001.nii.gz",
    ]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_voxels_no_dwi_station_covers_are_labelled_ignore(tmp_path: Path, capsys) -> None:
    """Two T1 stations but only the lower DWI station: above the last DWI slice (phantom z
    centre z_first + 1.5 k) and its half slice there is no b1000 image, so the annotation there
    becomes nnU-Net's ``ignore`` label (2 for the lesion set), declared in dataset.json."""
    exam = _exam(tmp_path / "src", "pat1", stations=2, overlap=16, missing_dwi_station=1)
    labels = _labels(tmp_path / "labels", "pat1", "tiny")
    out = tmp_path / "out"
    assert main(["import-dicom", str(tmp_path / "src"), str(out), "--labels", str(labels)]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "lesion": 1, "ignore": 2}
    z_first, z_last = exam.station_ranges[0]
    last_slice = z_first + 1.5 * ((z_last - z_first) // 1.5)  # the DWI grid of tests/dicom_exams
    first_uncovered = int(np.floor(last_slice + 0.75)) + 1
    label, _ = _read(out / "labelsTr" / "pat1.nii.gz")
    lesions = phantom("tiny")[0].lesion_mask
    assert (label[..., first_uncovered:] == 2).all()
    np.testing.assert_array_equal(label[..., :first_uncovered], lesions[..., :first_uncovered])
    manifest = json.loads((out / "manifests" / "pat1.json").read_text())
    assert manifest["label"]["ignored_voxels"] == int((label == 2).sum())
    assert main(["check-data", str(out)]) == 0
    assert "label 'ignore' = 2" in capsys.readouterr().out


def test_rerunning_on_the_same_folder_is_idempotent(tmp_path: Path, capsys) -> None:
    _exam(tmp_path / "src", "pat1", stations=2, overlap=16)
    out = tmp_path / "out"
    command = ["import-dicom", str(tmp_path / "src"), str(out), "--adc"]
    assert main(command) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(command) == 0
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(first) == sorted(second)
    assert first == second  # byte for byte: NIfTI files, manifests and all
    # another channel set into the same folder is refused before anything is written
    capsys.readouterr()
    assert main(["import-dicom", str(tmp_path / "src"), str(out)]) == 2
    assert (
        "imported as a plain folder with channels ['T1', 'b1000', 'ADC']" in capsys.readouterr().err
    )
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == second


def test_registration_recovers_patient_movement(tmp_path: Path) -> None:
    shift = np.array([5.0, -4.0, 12.0])  # LPS mm: the patient moved between T1 and DWI
    _exam(tmp_path / "src", "pat1", "small", dwi_shift_mm=tuple(shift))
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out"), "--register"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    slice_step = manifest["dwi"]["stations"][0]["spacing_mm"][2]
    assert abs(shift[2]) > slice_step  # unregistered, every station is off by more than a slice
    for station in manifest["dwi"]["stations"]:
        registration = station["registration"]
        assert registration["kind"] == "rigid"
        assert np.all(np.abs(registration["rotation_deg"]) < 2.0)
        # T1 point -> DWI point: the DWI shows at x what the T1 shows at x + shift
        error = np.asarray(registration["translation_mm"]) + shift
        # In plane the movement is found to a fraction of a millimetre. Along the body the
        # stations' contrast differs (b1000 fat-suppressed, the phantom's own b1000 station
        # steps), which pulls mutual information by up to most of a DWI slice.
        assert np.all(np.abs(error[:2]) < 1.0), (station["description"], error)
        assert abs(error[2]) < slice_step, (station["description"], error)


def test_two_contrasts_per_station_need_t1_and_then_import(tmp_path: Path, capsys) -> None:
    _exam(tmp_path / "src", "pat1", stations=2, overlap=16, other_contrast=True)
    out = tmp_path / "out"
    assert main(["import-dicom", str(tmp_path / "src"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sap import-dicom: error: case pat1: series ") and "\n" not in err
    assert "(T1 station 1)" in err and "(STIR station 1)" in err and "pass --t1 REGEX" in err
    assert not out.exists() or not any(out.rglob("pat1*"))
    assert main(["import-dicom", str(tmp_path / "src"), str(out), "--t1", "^t1 "]) == 0
    manifest = json.loads((out / "manifests" / "pat1.json").read_text())
    ignored = sorted(d["description"] for d in manifest["dropped"])
    assert ignored == ["STIR station 1", "STIR station 2"]
    assert {d["reason"] for d in manifest["dropped"]} == {"not matching --t1 '^t1 '"}


def test_b_value_choice_and_a_three_b_value_adc(tmp_path: Path) -> None:
    case, _ = phantom("tiny")
    _exam(tmp_path / "src", "pat1", stations=2, overlap=16, b_values=(50.0, 600.0, 1000.0))
    default, chosen = tmp_path / "b1000", tmp_path / "b600"
    assert main(["import-dicom", str(tmp_path / "src"), str(default), "--adc"]) == 0
    assert main(["import-dicom", str(tmp_path / "src"), str(chosen), "--b-value", "550"]) == 0
    manifest = json.loads((chosen / "manifests" / "pat1.json").read_text())
    assert manifest["dwi"]["b_values"] == [50.0, 600.0, 1000.0]
    assert manifest["dwi"]["b_value_used"] == 600.0
    b1000, affine = _read(default / "pat1_0001.nii.gz")
    b600, _ = _read(chosen / "pat1_0001.nii.gz")
    adc, _ = _read(default / "pat1_0002.nii.gz")
    body = ndimage.binary_erosion(case.maps.tissue > 0, np.ones((3, 3, 3)), iterations=3)
    inner = body & (b1000 > np.percentile(b1000[body], 50))
    # S_600 / S_1000 = exp(400 ADC): the channel holds the b600 image of the same stations
    expected = np.exp(400.0 * known_adc_on_grid(affine, b600.shape) * 1e-3)
    assert np.median(np.abs(b600[inner] / b1000[inner] / expected[inner] - 1)) < 0.01
    assert np.median(np.abs(adc - known_adc_on_grid(affine, adc.shape))[inner]) < 1e-3


def test_n4_corrects_each_station_and_keeps_the_image(tmp_path: Path) -> None:
    case, _ = phantom("tiny")
    _exam(tmp_path / "src", "pat1", stations=2, overlap=16)
    assert main(["import-dicom", str(tmp_path / "src"), str(tmp_path / "out"), "--n4"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifests" / "pat1.json").read_text())
    for role in ("t1", "dwi"):
        assert [s["n4"] for s in manifest[role]["stations"]] == ["corrected"] * 2
    t1, _ = _read(tmp_path / "out" / "pat1_0000.nii.gz")
    body = case.maps.tissue > 0
    assert _corr(t1[body], case.t1[body]) >= 0.95  # a smooth field less, the same anatomy


def test_sap_predict_takes_the_plain_folder(tmp_path: Path, capsys) -> None:
    from tests.checkpoints import write_checkpoint

    _exam(tmp_path / "src", "pat1", stations=2, overlap=16)
    out = tmp_path / "out"
    assert main(["import-dicom", str(tmp_path / "src"), str(out)]) == 0
    assert f"next: sap predict --input {out}" in capsys.readouterr().out
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoints" / "last.ckpt", spacing=SIZES["tiny"][1])
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.5}))
    predictions = tmp_path / "predictions"
    command = ["predict", "--checkpoint", str(run), "--input", str(out), "--out", str(predictions)]
    assert main([*command, "--no-progress"]) == 0
    mask = nib.load(predictions / "pat1.nii.gz")
    t1 = nib.load(out / "pat1_0000.nii.gz")
    assert mask.shape == t1.shape and np.allclose(mask.affine, t1.affine)
