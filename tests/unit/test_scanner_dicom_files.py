"""Reading DICOM headers for the scanner import: b-value tags of every vendor, files that are not
DICOM, broken and unsupported files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from sap_lightning.core.errors import DatasetError
from sap_lightning.scanner.dicom_files import read_b_value, scan_case


def _image(**tags: object) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SeriesDescription = "DWI"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [2, 1]
    set_pixel_data(ds, np.arange(48, dtype=np.uint16).reshape(6, 8), "MONOCHROME2", 16)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def test_standard_tag_is_read_and_wins_over_vendor_tags() -> None:
    ds = _image(DiffusionBValue=800.0)
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "50")
    assert read_b_value(ds) == (800.0, "(0018,9087)")


@pytest.mark.parametrize(
    ("group", "creator", "offset", "vr", "value", "expected", "vendor"),
    [
        (0x0019, "SIEMENS MR HEADER", 0x0C, "IS", "750", 750.0, "Siemens (0019,100C)"),
        (0x0043, "GEMS_PARM_01", 0x39, "IS", [1000000750, 8, 0, 0], 750.0, "GE (0043,1039)"),
        (0x0043, "GEMS_PARM_01", 0x39, "IS", [2000000050, 8, 0, 0], 50.0, "GE (0043,1039)"),
        (0x2001, "Philips Imaging DD 001", 0x03, "FL", 750.0, 750.0, "Philips (2001,1003)"),
    ],
)
def test_vendor_tags_are_read(group, creator, offset, vr, value, expected, vendor) -> None:
    ds = _image()
    ds.private_block(group, creator, create=True).add_new(offset, vr, value)
    assert read_b_value(ds) == (expected, vendor)


def test_private_creator_in_another_block_is_followed() -> None:
    ds = _image()
    ds.private_block(0x0019, "SOMEONE ELSE", create=True).add_new(0x0C, "LO", "not a b-value")
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    assert block.block_start == 0x1100  # the usual 0x10 block is taken
    block.add_new(0x0C, "IS", "1000")
    assert read_b_value(ds) == (1000.0, "Siemens (0019,110C)")


def test_raw_bytes_of_an_implicit_export_are_decoded() -> None:
    ds = _image()
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")  # the private creator of block 0x10
    ds.add_new(0x0019100C, "UN", b"900 ")  # value kept as raw bytes (implicit VR, no dictionary)
    assert read_b_value(ds) == (900.0, "Siemens (0019,100C)")
    philips = _image()
    philips.add_new(0x20010010, "LO", "Philips Imaging DD 001")
    philips.add_new(0x20011003, "UN", np.float32(650.0).tobytes())
    assert read_b_value(philips) == (650.0, "Philips (2001,1003)")


def test_the_usual_block_is_read_when_the_creator_was_removed() -> None:
    ds = _image()
    ds.add_new(0x0043_1039, "IS", [1000000800, 8, 0, 0])  # no (0043,0010) creator
    assert read_b_value(ds) == (800.0, "GE (0043,1039)")


def test_no_b_value_without_any_tag() -> None:
    assert read_b_value(_image()) == (None, None)


def _write(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_scan_skips_files_that_are_not_dicom_and_reads_nested_ones(tmp_path: Path) -> None:
    case = tmp_path / "case1"
    _write(case / "a" / "b" / "IM1", _image(DiffusionBValue=50.0))
    _write(case / "x.dcm", _image(DiffusionBValue=1000.0))
    (case / "notes.txt").write_text("hello")
    (case / ".hidden").write_bytes(b"\x00" * 200)
    directory = Dataset()  # a DICOM file that is no image (a DICOMDIR-like record)
    directory.file_meta = FileMetaDataset()
    directory.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    directory.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _write(case / "DICOMDIR", directory)
    scan = scan_case(case)
    assert sorted(s.b_value for s in scan.slices) == [50.0, 1000.0]
    assert scan.not_dicom == 1  # notes.txt; hidden files are not visited
    assert scan.not_images == {"no image geometry": 1}


def test_a_truncated_header_is_refused_naming_case_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "case7" / "sub" / "IM5", _image(DiffusionBValue=50.0))
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\x20\x00\x32\x00")])  # cut before the position
    with pytest.raises(DatasetError, match=r"case case7: case7/sub/IM5: incomplete MR Image"):
        scan_case(tmp_path / "case7")


def test_multiframe_files_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "c" / "f", _image(NumberOfFrames=4))
    with pytest.raises(DatasetError, match=r"case c: c/f: multi-frame DICOM"):
        scan_case(tmp_path / "c")


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme").write_text("x")
    with pytest.raises(DatasetError, match=r"case c: .*no DICOM image files"):
        scan_case(tmp_path / "c")
