"""How faithfully ``sap import-dicom`` returns a phantom case written as a scanner's DICOM exam.

Writes patient 1 of cohort seed 0 on a phantom grid as the synthetic exam of
``tests/dicom_exams.py`` (5 overlapping stations, each with its own gain; DWI at half the
in-plane resolution with 1.5x thicker slices, b50 and b1000 in one series), imports it through
the command line (``sap import-dicom --adc --labels``, timed with start-up) and prints, inside
the phantom's body:

- T1 and b1000 correlation with the phantom (b1000 also with the phantom blurred to the DWI's
  resolution, a Gaussian of its voxel's FWHM: what the coarser acquisition can hold; and that
  blurred phantom's own correlation with the phantom, the ceiling for the first);
- the largest lesion's centroid offset, in voxels, in the imported label;
- each station's intensity relative to the centre station after standardisation (1 = no step);
- the largest ADC error on the known map where the DWI has signal (10^-3 mm^2/s);
- with ``--skeleton-checkpoint`` (a stage-1 run) and ``--checkpoint`` (any lesion run, which
  ``sap predict`` needs), the Dice between the skeleton masks predicted on the case imported as
  a plain folder and on the phantom's own files.

    python benchmarks/import_roundtrip.py [--size small] [--out DIR]
        [--skeleton-checkpoint runs/demo/pretrain --checkpoint runs/demo/sap/fold1]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the independent DICOM writer

from sap_lightning.dataset.images import read_canonical  # noqa: E402
from sap_lightning.dataset.layout import affine_from_spacing  # noqa: E402
from sap_lightning.synthetic import SIZES, generate_patient_case  # noqa: E402
from tests.datasets import save  # noqa: E402
from tests.dicom_exams import ExamSpec, known_adc_on_grid, write_dicom_exam  # noqa: E402

DWI_VOXEL = (2.0, 2.0, 1.5)
"""The exam's DWI voxel in phantom voxels (axial)."""


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _sap(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sap_lightning", *args], check=True)


def _skeleton_agreement(root: Path, imported: Path, args: argparse.Namespace) -> float:
    """Dice of the skeleton ``sap predict`` maps on the imported and the original files."""
    masks = []
    for name, folder in (("original", root / "original"), ("imported", imported)):
        out = root / f"predictions_{name}"
        _sap("predict", "--checkpoint", str(args.checkpoint), "--skeleton-checkpoint",
             str(args.skeleton_checkpoint), "--input", str(folder), "--out", str(out),
             "--no-progress")  # fmt: skip
        image = nib.as_closest_canonical(nib.load(out / "skeleton" / "pat1.nii.gz"))
        masks.append(np.asarray(image.dataobj) > 0)
    return float(2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum()))


def _station_scales(
    imported: np.ndarray, original: np.ndarray, body: np.ndarray, ranges: list[tuple[int, int]]
) -> np.ndarray:
    """Imported over original intensity on each station's own slices (two slices clear of
    each overlap), relative to the centre station's: 1 everywhere when no step remains."""
    ratios = []
    for k, (first, last) in enumerate(ranges):
        start = ranges[k - 1][1] + 2 if k else first
        stop = ranges[k + 1][0] - 2 if k + 1 < len(ranges) else last
        own = (slice(None), slice(None), slice(start, stop + 1))
        ratios.append(imported[own][body[own]].sum() / original[own][body[own]].sum())
    return np.asarray(ratios) / ratios[len(ratios) // 2]


def measure(root: Path, args: argparse.Namespace) -> None:
    """Write the exam into ``root``, import it and print the table."""
    shape, spacing = SIZES[args.size]
    affine = affine_from_spacing(spacing)
    case = generate_patient_case(0, 1, shape, spacing)
    body = case.maps.tissue > 0
    save(root / "original" / "pat1_0000.nii.gz", case.t1, affine)
    save(root / "original" / "pat1_0001.nii.gz", case.b1000, affine)
    save(root / "labels" / "pat1.nii.gz", case.lesion_mask, affine)
    exam = write_dicom_exam(
        root / "exam" / "pat1", case.t1, case.b1000, affine, ExamSpec(), body=body
    )
    out = root / "imported"
    start = time.perf_counter()
    _sap("import-dicom", str(root / "exam"), str(out), "--adc", "--labels", str(root / "labels"))
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2

    t1, _, _ = read_canonical(out / "imagesTr" / "pat1_0000.nii.gz")
    b1000, _, _ = read_canonical(out / "imagesTr" / "pat1_0001.nii.gz")
    adc, adc_affine, _ = read_canonical(out / "imagesTr" / "pat1_0002.nii.gz")
    label, _, _ = read_canonical(out / "labelsTr" / "pat1.nii.gz")
    blurred = ndimage.gaussian_filter(
        case.b1000.astype(np.float64), [w / 2.3548 for w in DWI_VOXEL]
    )
    lesion = case.lesion_ids == int(np.argmax(np.bincount(case.lesion_ids.ravel())[1:])) + 1
    parts = ndimage.label(label > 0)[0]
    found = parts == parts[tuple(np.argwhere(lesion)[0])]
    offset = np.abs(ndimage.center_of_mass(found) - np.asarray(ndimage.center_of_mass(lesion)))
    steps = {
        "T1": _station_scales(t1, case.t1, body, exam.station_ranges),
        "b1000": _station_scales(b1000, blurred, body, exam.station_ranges),
    }
    signal = body & (blurred >= 0.1 * np.percentile(blurred[body], 99))
    signal = ndimage.binary_erosion(signal, np.ones((3, 3, 3)), iterations=2)
    adc_error = np.abs(adc - known_adc_on_grid(adc_affine, adc.shape))[signal].max()

    rows = [
        ("grid", f"{args.size}: {shape} voxels of {spacing} mm"),
        ("exam", f"{sum(1 for p in exam.folder.rglob('*') if p.is_file())} files"),
        ("import wall time (start-up included)", f"{seconds:.1f} s"),
        ("import peak memory", f"{peak_gb:.2f} GB"),
        ("T1 correlation", f"{_corr(t1[body], case.t1[body]):.4f}"),
        ("b1000 correlation", f"{_corr(b1000[body], case.b1000[body]):.4f}"),
        ("b1000 correlation at the DWI's resolution", f"{_corr(b1000[body], blurred[body]):.4f}"),
        (
            "phantom at the DWI's resolution vs phantom",
            f"{_corr(blurred[body], case.b1000[body]):.4f}",
        ),
        ("largest lesion's centroid offset (voxels)", ", ".join(f"{v:.2f}" for v in offset)),
        *(
            (f"{name} station scale / centre's", ", ".join(f"{v:.3f}" for v in scales))
            for name, scales in steps.items()
        ),
        ("ADC largest error (10^-3 mm^2/s)", f"{adc_error:.2e}"),
    ]
    if args.skeleton_checkpoint:
        plain = root / "imported_plain"  # T1 and b1000 only, the channels of the network
        _sap("import-dicom", str(root / "exam"), str(plain))
        agreement = _skeleton_agreement(root, plain, args)
        rows.append(("skeleton Dice, imported vs original", f"{agreement:.3f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--out", type=Path, help="keep the files here (default: a temporary folder)"
    )
    parser.add_argument("--skeleton-checkpoint", type=Path, help="a stage-1 run folder")
    parser.add_argument(
        "--checkpoint", type=Path, help="any lesion run folder (sap predict needs one)"
    )
    args = parser.parse_args(argv)
    if bool(args.skeleton_checkpoint) != bool(args.checkpoint):
        parser.error("--skeleton-checkpoint and --checkpoint go together")
    if args.out:
        if args.out.exists() and any(args.out.iterdir()):
            parser.error(f"--out {args.out} is not empty (a second exam would mix with the first)")
        args.out.mkdir(parents=True, exist_ok=True)
        measure(args.out, args)
    else:
        with tempfile.TemporaryDirectory() as folder:
            measure(Path(folder), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
