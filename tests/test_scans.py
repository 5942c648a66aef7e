"""Scans of every format as model slices: kind from the bytes, volumes preprocessed as at ingestion, DICOM
de-identified on arrival, and a clear error naming the upload for anything else."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.errors import DataError
from components.scans import UnsupportedInput, read_scan, sniff
from tests.dicom_fixtures import write_series, write_zip
from tests.test_volumes import _head, _save

KEY = b"test-key"


@pytest.fixture(autouse=True)
def _no_params(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default volume preprocessing


def test_kind_comes_from_the_bytes_not_the_name(tmp_path: Path):
    png = tmp_path / "scan.nii"  # a misleading name
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    assert sniff(png.read_bytes()) == "image"
    volume = _save(tmp_path / "v.nii.gz", _head(size=16))
    assert sniff(volume.read_bytes()) == "nifti"
    assert sniff(gzip.decompress(volume.read_bytes())) == "nifti"
    with pytest.raises(UnsupportedInput, match="unsupported file type"):
        sniff(b"%PDF-1.7 not a scan")
    with pytest.raises(UnsupportedInput):
        sniff(gzip.compress(b"just text, gzipped"))


def test_a_slice_is_one_scan_slice(tmp_path: Path):
    path = tmp_path / "slice.png"
    Image.fromarray((np.arange(64 * 64) % 255).reshape(64, 64).astype(np.uint8)).save(path)
    scan = read_scan(path, KEY)
    assert scan.kind == "image" and len(scan.slices) == 1 and scan.slices[0].shape == (64, 64)


def test_a_nifti_volume_becomes_its_brain_slices(tmp_path: Path):
    upload = _save(tmp_path / "v.nii.gz", _head()).rename(tmp_path / "upload.bin")  # no suffix needed
    scan = read_scan(upload, KEY)
    assert scan.kind == "nifti" and len(scan.slices) >= 5 and len(scan.indices) == len(scan.slices)
    assert all(s.ndim == 2 and 0 <= s.min() and s.max() <= 1 for s in scan.slices)


def test_a_dicom_zip_of_one_series_is_read_and_a_single_file_too(tmp_path: Path):
    files = write_series(tmp_path / "series", n_slices=6)
    scan = read_scan(write_zip(tmp_path / "series.zip", tmp_path / "series"), KEY)
    assert scan.kind == "dicom" and len(scan.slices) >= 1
    single = read_scan(files[2], KEY)
    assert single.kind == "dicom" and len(single.slices) == 1


def test_two_series_in_one_upload_and_broken_files_are_refused_by_name(tmp_path: Path):
    write_series(tmp_path / "two", n_slices=3, series_uid="1.2.826.0.1.3680043.8.498.1")
    write_series(tmp_path / "two", n_slices=3, series_uid="1.2.826.0.1.3680043.8.498.2")
    with pytest.raises(DataError, match="^upload: the upload holds 2 image series"):
        read_scan(write_zip(tmp_path / "two.zip", tmp_path / "two"), KEY)
    write_series(tmp_path / "ct", n_slices=3, modality="CT")
    with pytest.raises(DataError, match="^upload: no usable DICOM image series \\(modality CT, not MR"):
        read_scan(write_zip(tmp_path / "ct.zip", tmp_path / "ct"), KEY)
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(_save(tmp_path / "v.nii.gz", _head()).read_bytes()[:400])
    with pytest.raises(DataError, match="^upload: "):
        read_scan(truncated, KEY)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_scan(empty, KEY)
