"""De-identification (PS3.15 basic profile): nothing planted survives, UIDs stay consistent, options behave."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from components.deid import BURNED_IN, PROFILE, deidentify, identifying_values, remap_uid
from components.errors import DataError
from components.privacy import pseudonym
from tests.dicom_fixtures import FRAME_UID, PHI, SERIES_UID, STUDY_UID, write_series

KEY = b"test-key-deid"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in write_series(tmp_path_factory.mktemp("deid"), n_slices=3)]


def text_values(ds: Dataset) -> list[str]:
    """Every text value at any depth, file meta included."""
    elements = list(ds.iterall()) + list(getattr(ds, "file_meta", Dataset()).iterall())
    return [str(e.value) for e in elements if e.VR != "SQ" and e.value is not None and not isinstance(e.value, bytes)]


def test_profile_table_uses_real_keywords_and_action_codes():
    assert all(tag_for_keyword(k) is not None for k in PROFILE), [k for k in PROFILE if tag_for_keyword(k) is None]
    assert set(PROFILE.values()) <= {"D", "Z", "X", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    assert PROFILE["PatientBirthDate"] == "Z" and PROFILE["InstitutionAddress"] == "X" and PROFILE["SOPInstanceUID"] == "U"


def test_planted_identifiers_are_gone(slices):
    original = slices[0]
    out = deidentify(original, KEY)
    text = str(out) + str(out.file_meta)
    leaks = [v for v in PHI.values() if v in text]
    assert not leaks
    assert "Janeway" not in text and "Doe" not in text and "Exampletown" not in text
    found = identifying_values(original)
    assert {PHI["PatientName"], PHI["InstitutionName"], STUDY_UID, f"scanned for {PHI['PatientName']}"} <= found
    values = text_values(out)
    assert not [v for v in found if v in values]
    assert not [v for v in found if len(v) >= 6 and any(v in value for value in values)]


def test_private_tags_and_overlay_groups_are_removed_at_every_depth(slices):
    assert any(e.tag.is_private for e in slices[0].iterall())  # the fixture did plant them
    out = deidentify(slices[0], KEY)
    assert not [e.tag for e in out.iterall() if e.tag.is_private]
    assert not [e.tag for e in out.iterall() if e.tag.group & 0xFF00 in (0x5000, 0x6000)]
    assert "DataSetTrailingPadding" not in out


def test_sequences_are_cleaned_recursively_and_references_follow_the_remap(slices):
    outs = [deidentify(ds, KEY) for ds in slices]
    referenced = outs[1].ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == outs[1].SeriesInstanceUID != SERIES_UID
    instance = referenced.ReferencedInstanceSequence[0]
    assert instance.ReferencedSOPInstanceUID == outs[0].SOPInstanceUID  # the reference still points at slice 0
    assert "PerformingPhysicianName" not in instance
    assert instance.ReferencedSOPClassUID == pydicom.uid.MRImageStorage  # class UIDs are not instances


def test_uids_are_remapped_consistently_within_a_key_and_differ_across_keys(slices):
    outs = [deidentify(ds, KEY) for ds in slices]
    for keyword, original in zip(UID_KEYWORDS, (STUDY_UID, SERIES_UID, FRAME_UID)):
        assert len({str(o.get(keyword)) for o in outs}) == 1
        assert outs[0].get(keyword) != original
    sops = [str(o.SOPInstanceUID) for o in outs]
    assert len(set(sops)) == 3 and all(s.startswith("2.25.") and len(s) <= 64 for s in sops)
    assert [str(o.file_meta.MediaStorageSOPInstanceUID) for o in outs] == sops
    assert [str(deidentify(ds, KEY).SOPInstanceUID) for ds in slices] == sops  # deterministic
    other = deidentify(slices[0], b"another-key")
    assert other.SeriesInstanceUID != outs[0].SeriesInstanceUID and other.SOPInstanceUID != sops[0]
    assert remap_uid(SERIES_UID, KEY) == outs[0].SeriesInstanceUID


def test_one_patient_stays_one_subject_under_a_keyed_pseudonym(slices, tmp_path):
    outs = [deidentify(ds, KEY) for ds in slices]
    subject = pseudonym(PHI["PatientID"], KEY, "sub-")
    assert {str(o.PatientID) for o in outs} == {str(o.PatientName) for o in outs} == {subject}
    stranger = pydicom.dcmread(write_series(tmp_path, n_slices=1, patient_id="MRN-0000001")[0])
    assert deidentify(stranger, KEY).PatientID != subject


def test_patient_characteristics_are_kept_only_with_the_option(slices):
    kept = deidentify(slices[0], KEY)
    assert (kept.PatientSex, kept.PatientAge) == ("F", "045Y")
    assert "Retain Patient Characteristics Option" in kept.DeidentificationMethod
    dropped = deidentify(slices[0], KEY, keep_patient_characteristics=False)
    assert not dropped.get("PatientSex") and "PatientAge" not in dropped and "PatientWeight" not in dropped
    assert "Retain Patient Characteristics Option" not in dropped.DeidentificationMethod
    for out in (kept, dropped):
        assert not out.get("PatientBirthDate")
        assert out.PatientIdentityRemoved == "YES"
        assert "Basic Application Confidentiality Profile" in out.DeidentificationMethod
        assert not out.get("StudyDate") and "SeriesDate" not in out and "AcquisitionDate" not in out


def test_burned_in_annotation_is_refused_without_naming_the_patient(tmp_path):
    ds = pydicom.dcmread(write_series(tmp_path, n_slices=1, burned_in=True)[0])
    with pytest.raises(DataError) as caught:
        deidentify(ds, KEY, name="IM0001")
    assert caught.value.problem == BURNED_IN and caught.value.path == "IM0001"
    with pytest.raises(DataError) as unnamed:
        deidentify(ds, KEY)
    assert PHI["PatientName"] not in str(unnamed.value) and PHI["PatientID"] not in str(unnamed.value)


def test_descriptors_stay_unless_they_carry_an_identifier(tmp_path):
    clean = pydicom.dcmread(write_series(tmp_path / "a", n_slices=1, description="AX T2 FLAIR")[0])
    assert deidentify(clean, KEY).SeriesDescription == "AX T2 FLAIR"
    leaky = pydicom.dcmread(write_series(tmp_path / "b", n_slices=1, description="FLAIR for JANE doe")[0])
    leaky.ProtocolName = "brain St Example Hospital"
    out = deidentify(leaky, KEY)
    assert "SeriesDescription" not in out and "ProtocolName" not in out
    dated = pydicom.dcmread(write_series(tmp_path / "c", n_slices=1, description=f"FLAIR {PHI['StudyDate']}")[0])
    assert "SeriesDescription" not in deidentify(dated, KEY)


def test_the_original_is_untouched_and_the_copy_is_a_valid_dicom_file(slices):
    original = slices[0]
    out = deidentify(original, KEY)
    assert original.PatientName == PHI["PatientName"] and original.StudyInstanceUID == STUDY_UID
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert again.SOPInstanceUID == out.SOPInstanceUID and again.pixel_array.shape == (64, 64)
    assert "SourceApplicationEntityTitle" not in again.file_meta
