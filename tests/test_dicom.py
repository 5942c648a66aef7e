"""DICOM series ingestion: grouping, spatial sort, geometry, zip input, and quarantine of what cannot be used."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from components.deid import BURNED_IN
from components.dicom import guess_sequence, parse_age, read_series, write_nifti
from components.errors import DataError
from components.privacy import pseudonym
from tests.dicom_fixtures import FIRST_POSITION, PHI, PIXEL_SPACING, SLICE_OFFSET, base_pixels, fixed_uid, write_series, write_zip

KEY = b"test-key-dicom"
X0, Y0, Z0 = FIRST_POSITION


def expected_slice(k: int, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    return (base_pixels() // 4 + SLICE_OFFSET * k).astype(np.float32) * slope + intercept


def shuffle_names(folder: Path) -> None:
    """Rename every file to a neutral name in a fixed random order, so series interleave on disk."""
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    random.Random(7).shuffle(paths)
    moved = [p.rename(p.with_name(f"tmp-{i}")) for i, p in enumerate(paths)]
    for i, path in enumerate(moved):
        path.rename(folder / f"{i:03d}")


def test_two_interleaved_series_are_grouped_and_each_sorted_by_position(tmp_path):
    write_series(tmp_path, n_slices=6, description="AX FLAIR")
    write_series(tmp_path, n_slices=4, series_uid=fixed_uid("second"), description="T1 post")
    shuffle_names(tmp_path)
    series, quarantined = read_series(tmp_path, KEY)
    assert quarantined == []
    by_sequence = {s.sequence: s for s in series}
    assert set(by_sequence) == {"flair", "t1c"}
    flair, t1c = by_sequence["flair"], by_sequence["t1c"]
    assert (flair.files, t1c.files) == (6, 4)
    assert flair.volume.shape == (6, 64, 64) and flair.volume.dtype == np.float32
    for s in (flair, t1c):
        for k in range(s.files):
            np.testing.assert_array_equal(s.volume[k], expected_slice(k))
        assert [int(h.InstanceNumber) for h in s.headers] == list(range(1, s.files + 1))
    assert flair.subject == t1c.subject == pseudonym(PHI["PatientID"], KEY, "sub-")
    assert flair.uid_pseudonym != t1c.uid_pseudonym and flair.uid_pseudonym.startswith("ser-")
    assert (flair.modality, flair.sex, flair.age) == ("MR", "F", 45.0)


def test_position_decides_the_order_not_the_instance_number(tmp_path):
    # InstanceNumber rises with k while z falls: sorted by position, slice k=4 comes first
    write_series(tmp_path, n_slices=5, positions=[20.0, 18.0, 16.0, 14.0, 12.0])
    (series,), _ = read_series(tmp_path, KEY)
    for row, k in enumerate([4, 3, 2, 1, 0]):
        np.testing.assert_array_equal(series.volume[row], expected_slice(k))
    assert series.affine[2, 3] == pytest.approx(12.0)
    assert series.spacing[2] == pytest.approx(2.0)


def test_geometry_affine_and_nifti_orientation(tmp_path):
    write_series(tmp_path / "in", n_slices=6)
    (series,), _ = read_series(tmp_path / "in", KEY)
    assert series.spacing == pytest.approx((PIXEL_SPACING, PIXEL_SPACING, 2.0))
    expected = np.array(
        [[-PIXEL_SPACING, 0, 0, -X0], [0, -PIXEL_SPACING, 0, -Y0], [0, 0, 2.0, Z0], [0, 0, 0, 1]],
    )
    np.testing.assert_allclose(series.affine, expected, atol=1e-9)
    image = nib.load(write_nifti(series, tmp_path / "out" / "flair.nii.gz"))
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # DICOM axial: +i toward the left, +j posterior
    assert image.header.get_zooms() == pytest.approx((PIXEL_SPACING, PIXEL_SPACING, 2.0))
    assert image.shape == (64, 64, 6)
    data = np.asarray(image.dataobj)
    np.testing.assert_array_equal(data[:, :, 3], series.volume[3].T)
    # voxel (column 10, row 20, slice 3) sits at LPS (x0 + 10 dx, y0 + 20 dy, z0 + 3 dz); RAS flips x and y
    world = image.affine @ np.array([10, 20, 3, 1])
    np.testing.assert_allclose(world[:3], [-(X0 + 10 * PIXEL_SPACING), -(Y0 + 20 * PIXEL_SPACING), Z0 + 6.0], atol=1e-5)


def test_a_zip_gives_the_same_series_as_the_folder(tmp_path):
    write_series(tmp_path / "in", n_slices=6)
    write_series(tmp_path / "in" / "sub", n_slices=3, series_uid=fixed_uid("zipped"), description="AX T2")
    (tmp_path / "in" / "notes.txt").write_text("clinic notes")
    from_folder, q_folder = read_series(tmp_path / "in", KEY)
    from_zip, q_zip = read_series(write_zip(tmp_path / "export.zip", tmp_path / "in"), KEY)
    assert [s.uid_pseudonym for s in from_zip] == [s.uid_pseudonym for s in from_folder]
    assert len(from_zip) == 2
    for a, b in zip(from_folder, from_zip):
        np.testing.assert_array_equal(a.volume, b.volume)
        np.testing.assert_array_equal(a.affine, b.affine)
        assert (a.sequence, a.spacing, a.files) == (b.sequence, b.spacing, b.files)
    assert q_folder == [("notes.txt", "not a DICOM file")]
    assert q_zip == [("export/notes.txt", "not a DICOM file")]


def test_a_zip_member_whose_compressed_bytes_are_corrupt_is_quarantined_not_raised(tmp_path):
    import zipfile

    paths = write_series(tmp_path / "in", n_slices=6)
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in paths:
            out.write(path, path.name)
    with zipfile.ZipFile(archive) as packed:
        member = packed.getinfo(paths[2].name)
    data = bytearray(archive.read_bytes())
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)  # the local header, then the deflate stream
    data[start + 10 : start + 200] = bytes(byte ^ 0x55 for byte in data[start + 10 : start + 200])
    archive.write_bytes(bytes(data))
    _, quarantined = read_series(archive, KEY)
    reasons = dict(quarantined)
    assert reasons[paths[2].name].startswith("cannot be read from the zip")  # the archive is at fault, not the slice (zlib.error)


def test_a_slice_declaring_more_pixels_than_any_mri_is_quarantined_before_decoding(tmp_path):
    paths = write_series(tmp_path, n_slices=6)
    giant = pydicom.dcmread(paths[3])
    giant.Rows = giant.Columns = 20_000  # 400 M pixels: a decompression bomb once the data is compressed
    giant.save_as(paths[3], enforce_file_format=True)
    _, quarantined = read_series(tmp_path, KEY)
    assert dict(quarantined)[paths[3].name] == "20000 x 20000 pixels: larger than any MRI slice (at most 4096 a side); not decoded"


def test_junk_truncated_and_pixelless_files_are_quarantined_and_the_rest_read(tmp_path):
    paths = write_series(tmp_path, n_slices=6)
    (tmp_path / "notes.txt").write_text("patient was anxious")
    raw = paths[2].read_bytes()
    (tmp_path / "broken").write_bytes(raw[: len(raw) // 2])
    header_only = pydicom.dcmread(paths[0])
    del header_only.PixelData
    header_only.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    (tmp_path / "DICOMDIR").write_bytes(b"index, skipped")
    series, quarantined = read_series(tmp_path, KEY)
    reasons = dict(quarantined)
    assert set(reasons) == {"notes.txt", "broken", "report.dcm"}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["broken"].startswith("pixel data cannot be decoded")
    assert reasons["report.dcm"].startswith("no pixel data")
    assert len(series) == 1 and series[0].files == 6


def test_a_raw_dataset_without_the_dicm_preamble_is_still_read(tmp_path):
    (path,) = write_series(tmp_path, n_slices=1)
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)  # no preamble, no meta header: what some old exporters write
    path.write_bytes(buffer.getvalue())
    (series,), quarantined = read_series(tmp_path, KEY)
    assert quarantined == [] and series.files == 1
    np.testing.assert_array_equal(series.volume[0], expected_slice(0))


def test_headers_are_deidentified_and_hold_no_pixels(tmp_path):
    write_series(tmp_path, n_slices=3)
    (series,), _ = read_series(tmp_path, KEY)
    for header in series.headers:
        text = str(header)
        assert not [v for v in PHI.values() if v in text]
        assert header.PatientIdentityRemoved == "YES" and "PixelData" not in header
        assert not [e for e in header.iterall() if e.tag.is_private]
    assert not [v for v in PHI.values() if v in repr(series)]


def test_non_uniform_spacing_is_refused_under_the_series_pseudonym(tmp_path):
    write_series(tmp_path, n_slices=5, positions=[0.0, 2.0, 4.0, 7.0, 9.0], series_uid=fixed_uid("gappy"))
    write_series(tmp_path, n_slices=3)
    series, quarantined = read_series(tmp_path, KEY)
    assert len(series) == 1 and series[0].files == 3
    ((name, problem),) = quarantined
    assert name.startswith("ser-") and name != series[0].uid_pseudonym
    assert problem.startswith("non-uniform slice spacing")
    assert fixed_uid("gappy") not in name and PHI["PatientID"] not in name


def test_slices_of_different_sizes_are_refused(tmp_path):
    paths = write_series(tmp_path, n_slices=3)
    small = pydicom.dcmread(paths[1])
    cropped = small.pixel_array[:32, :32].copy()
    small.Rows = small.Columns = 32
    small.PixelData = cropped.tobytes()
    small.save_as(paths[1], enforce_file_format=True)
    series, quarantined = read_series(tmp_path, KEY)
    assert series == []
    ((name, problem),) = quarantined
    assert name.startswith("ser-") and "different sizes" in problem


def test_a_series_of_another_modality_is_refused_under_its_pseudonym(tmp_path):
    write_series(tmp_path, n_slices=2, series_uid="1.2.826.0.1.3680043.8.498.1")
    write_series(tmp_path, n_slices=2, series_uid="1.2.826.0.1.3680043.8.498.2", modality="CT")
    series, quarantined = read_series(tmp_path, KEY)
    assert [s.modality for s in series] == ["MR"]
    ((name, problem),) = quarantined
    assert name.startswith("ser-") and name != series[0].uid_pseudonym and problem.startswith("modality CT, not MR")
    with warnings.catch_warnings():  # pydicom may warn that the value is invalid: senders write such values all the same
        warnings.simplefilter("ignore", UserWarning)
        padded = write_series(tmp_path / "padded", n_slices=2, modality=" mr")  # leading spaces and case do not count
    assert all(pydicom.dcmread(path).Modality == " mr" for path in padded)
    assert [s.modality for s in read_series(tmp_path / "padded", KEY)[0]] == ["MR"]
    for path in write_series(tmp_path / "untagged", n_slices=2):  # no Modality tag: the storage class tells
        untagged = pydicom.dcmread(path)
        del untagged.Modality
        untagged.SOPClassUID = untagged.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        untagged.save_as(path, enforce_file_format=True)
    assert read_series(tmp_path / "untagged", KEY)[1][0][1].startswith("modality CT, not MR")


def test_burned_in_images_are_quarantined_before_reading(tmp_path):
    write_series(tmp_path, n_slices=2, burned_in=True)
    series, quarantined = read_series(tmp_path, KEY)
    assert series == []
    assert quarantined == [("IM0001", BURNED_IN), ("IM0002", BURNED_IN)]


def test_single_slice_rescale_and_characteristics(tmp_path):
    write_series(tmp_path, n_slices=1, rescale=(2.0, -10.0), sex="M", age="006M", description="t1_mprage_sag")
    (series,), _ = read_series(tmp_path, KEY)
    assert series.files == 1 and series.volume.shape == (1, 64, 64)
    assert series.spacing[2] == pytest.approx(0.8)  # MR_small's SliceThickness
    np.testing.assert_allclose(series.volume[0], expected_slice(0, 2.0, -10.0))
    assert (series.sex, series.age, series.sequence) == ("M", 0.5, "t1")


def test_missing_sex_and_age_are_unknown(tmp_path):
    write_series(tmp_path, n_slices=2, sex=None, age=None)
    (series,), _ = read_series(tmp_path, KEY)
    assert (series.sex, series.age) == (None, None)


@pytest.mark.parametrize(
    ("text", "sequence"),
    [
        ("AX FLAIR", "flair"),
        ("t2_tirm_tra_dark-fluid", "flair"),
        ("T1 post", "t1c"),
        ("T1+C", "t1c"),
        ("T1 GD", "t1c"),
        ("MPRAGE post", "t1c"),
        ("AX T1c", "t1c"),
        ("T1 pre-contrast", "t1"),
        ("t1_mprage_sag", "t1"),
        ("Sag T1 FLAIR", "t1"),
        ("AX T2", "t2"),
        ("t2_tse_tra", "t2"),
        ("T2* GRE", "unknown"),
        ("ep2d_diff", "unknown"),
        ("", "unknown"),
    ],
)
def test_sequence_guess(text, sequence):
    assert guess_sequence(text) == sequence


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45.0), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25), ("", None), ("45", None), (None, None)],
)
def test_age_parsing(value, years):
    assert parse_age(value) == (pytest.approx(years) if years is not None else None)


def test_unusable_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_series(tmp_path / "absent", KEY)
    (tmp_path / "scan.txt").write_text("not a zip")
    with pytest.raises(DataError, match="expected a folder"):
        read_series(tmp_path / "scan.txt", KEY)
