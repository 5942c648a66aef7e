"""De-identification of DICOM headers: PS3.15 Annex E, Basic Application Level Confidentiality Profile.

A DICOM header carries the patient's name, IDs, dates, the hospital and the staff,
and UIDs that can be traced back to the source PACS. Ingestion keeps none of these:
every dataset goes through :func:`deidentify` before anything else reads it.

Options applied (they are named in DeidentificationMethod, as the standard asks):

- Retain Patient Characteristics (default, switchable): sex, age, size and weight stay,
  because the fairness and drift reports stratify by them. Birth date always goes.
- Clean Descriptors, for SeriesDescription and ProtocolName only: they say which MRI
  sequence an image is, so they stay unless they contain an identifying value, in which
  case they are removed. Every other descriptor is removed as the basic profile says.

UIDs are replaced by a keyed hash (``2.25.<int>``): the same input and key always give
the same output, so the slices of one series, and the references between them, still
fit together, while the original UID cannot be recovered without the key.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
from collections.abc import Iterator

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from components.errors import DataError
from components.privacy import pseudonym

# Action codes of PS3.15 Table E.1-1 (basic profile column), by keyword:
# D dummy value of the same VR, Z zero length (or dummy), X remove, U replace UID.
# A compound code ("X/Z/D") lets the IOD decide; we take its first, least revealing
# choice, which is valid here because none of these is type 1 or 2 in the MR Image IOD
# (the Z/D ones, which can be type 2, start with Z).
PROFILE: dict[str, str] = {
    # patient
    "PatientName": "Z",
    "PatientID": "Z",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientBirthName": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X",
    "PatientMotherBirthName": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "PatientReligiousPreference": "X",
    "PatientComments": "X",
    "AdditionalPatientHistory": "X",
    "MedicalRecordLocator": "X",
    "IssuerOfPatientID": "X",
    "InsurancePlanIdentification": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "SmokingStatus": "X",
    "PregnancyStatus": "X",
    "LastMenstrualDate": "X",
    "SpecialNeeds": "X",
    "PatientState": "X",
    "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientAliasSequence": "X",
    "PatientInstitutionResidence": "X",
    "CurrentPatientLocation": "X",
    # visit and order
    "AdmissionID": "X",
    "IssuerOfAdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingTime": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X",
    "AccessionNumber": "Z",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "RequestAttributesSequence": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureDescription": "X/Z",
    "RequestedProcedureLocation": "X",
    "RequestedProcedureComments": "X",
    "RequestedContrastAgent": "X",
    "ReasonForStudy": "X",
    "ReasonForTheRequestedProcedure": "X",
    "ImagingServiceRequestComments": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X",
    # study, series and instance
    "StudyID": "Z",
    "StudyDate": "Z",
    "StudyTime": "Z",
    "SeriesDate": "X/D",
    "SeriesTime": "X/D",
    "AcquisitionDate": "X/Z",
    "AcquisitionTime": "X/Z",
    "AcquisitionDateTime": "X/Z/D",
    "ContentDate": "Z/D",
    "ContentTime": "Z/D",
    "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "TimezoneOffsetFromUTC": "X",
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ProtocolName": "X/D",
    "ImageComments": "X",
    "StudyComments": "X",
    "AcquisitionComments": "X",
    "DerivationDescription": "X",
    "IdentifyingComments": "X",
    "FrameComments": "X",
    "TextComments": "X",
    "ImagePresentationComments": "X",
    "ContrastBolusAgent": "Z/D",
    "ContrastBolusStartTime": "X",
    "ContrastBolusStopTime": "X",
    "ReferencedStudySequence": "X/Z",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedImageSequence": "X/Z/U*",
    "SourceImageSequence": "X/Z/U*",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ModifiedAttributesSequence": "X",
    "OriginalAttributesSequence": "X",
    "IconImageSequence": "X",
    "ContentSequence": "D",
    # institution, staff and equipment
    "InstitutionName": "X/Z/D",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionalDepartmentName": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ConsultingPhysicianName": "Z",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "OperatorsName": "X/Z/D",
    "OperatorIdentificationSequence": "X/D",
    "PersonName": "D",
    "PersonIdentificationCodeSequence": "D",
    "VerifyingObserverName": "D",
    "NamesOfIntendedRecipientsOfResults": "X",
    "StationName": "X/Z/D",
    "StationAETitle": "X",
    "RetrieveAETitle": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationName": "X",
    "PerformedLocation": "X",
    "ScheduledStationName": "X",
    "ScheduledStationAETitle": "X",
    "DeviceSerialNumber": "X/Z/D",
    "DetectorID": "X/D",
    "GantryID": "X",
    "GeneratorID": "X",
    "PlateID": "X",
    "CassetteID": "X",
    "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X",
    "DataSetTrailingPadding": "X",
    "DigitalSignaturesSequence": "X",
    # UIDs
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "MediaStorageSOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedSOPInstanceUIDInFile": "U",
    "InstanceCreatorUID": "U",
    "IrradiationEventUID": "U",
    "ConcatenationUID": "U",
    "DimensionOrganizationUID": "U",
    "DeviceUID": "U",
    "AcquisitionUID": "U",
    "StorageMediaFileSetUID": "U",
    "TransactionUID": "U",
    "UID": "U",
}

# The Retain Patient Characteristics Option keeps these ("K" in its column of Table E.1-1).
PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
# Kept under the Clean Descriptors Option when they hold no identifying value.
CLEAN_DESCRIPTORS = ("SeriesDescription", "ProtocolName")
# UI attributes that name a kind of object, not an instance: never remapped.
CLASS_UIDS = frozenset(
    {
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "MediaStorageSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextUID",
    }
)
_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
}
_TEXT_DUMMY = "ANONYMOUS"
_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_METHOD = ("Basic Application Confidentiality Profile", "Clean Descriptors Option")
_CHARACTERISTICS_METHOD = "Retain Patient Characteristics Option"
_METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"), ("113105", "Clean Descriptors Option"))
_CHARACTERISTICS_CODE = ("113108", "Retain Patient Characteristics Option")
_TOKEN_SPLIT = re.compile(r"[\s^,;:/\\_.=+()\[\]-]+")
_DOTTED_NUMBER = re.compile(r"^\s*[+-]?\d*\.\d[\d.]*\s*$")  # UIDs and decimal strings
BURNED_IN = "burned-in annotation: the pixels may show identifiers, so this image is refused"


def deidentify(ds: Dataset, key: bytes, keep_patient_characteristics: bool = True, name: str | None = None) -> Dataset:
    """A de-identified copy of ``ds``; the original is left untouched.

    ``name`` labels the image in errors (default: its remapped SOP Instance UID), since
    the caller must never have to print a patient value to say which image failed.
    """
    label = name or f"instance {remap_uid(str(ds.get('SOPInstanceUID', '')), key)}"
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DataError(label, BURNED_IN)
    tokens = _identifying_tokens(identifying_values(ds, keep_patient_characteristics))
    subject = pseudonym(_subject_source(ds), key, "sub-")
    out = Dataset()
    for elem in ds:
        out.add(copy.deepcopy(elem))
    _clean(out, key, keep_patient_characteristics)
    _clean_descriptors(out, tokens)
    out.PatientID = subject
    out.PatientName = subject
    _mark(out, keep_patient_characteristics)
    out.file_meta = _file_meta(ds, out)
    return out


def identifying_values(ds: Dataset, keep_patient_characteristics: bool = True) -> set[str]:
    """Every non-empty value the profile removes or replaces, found at any depth.

    Tests scan de-identified output for these; ``deidentify`` uses them to clean descriptors.
    """
    found: set[str] = set()
    for elem in ds:
        if _action(elem, keep_patient_characteristics) is not None:
            found.update(_values(elem))
        elif elem.VR == "SQ":
            for item in elem.value:
                found |= identifying_values(item, keep_patient_characteristics)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        found.add(str(meta.MediaStorageSOPInstanceUID))
    return found


def remap_uid(uid: str, key: bytes) -> str:
    """A keyed, deterministic replacement UID under the 2.25 (UUID-derived) root; at most 44 characters."""
    uid = uid.strip().rstrip("\x00")
    if not uid:
        return uid
    digest = hmac.new(key, f"uid:{uid}".encode(), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _action(elem: DataElement, keep_patient_characteristics: bool) -> str | None:
    """The concrete action (D, Z, X, U) for one element, or None to keep it."""
    tag = elem.tag
    if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000) or (tag.element == 0 and tag.group != 0x0002):
        return "X"  # private tags, curve and overlay groups, obsolete group lengths
    keyword = elem.keyword
    if keyword in CLEAN_DESCRIPTORS or (keep_patient_characteristics and keyword in PATIENT_CHARACTERISTICS):
        return None
    if keyword in PROFILE:
        return PROFILE[keyword].split("/")[0].rstrip("*")
    if elem.VR == "UI" and keyword not in CLASS_UIDS and any(UID(str(v)).is_private for v in _values(elem)):
        return "U"  # an instance UID the table does not list (PS3.15 E.3.10): still remapped
    return None


def _clean(ds: Dataset, key: bytes, keep_patient_characteristics: bool) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        action = _action(elem, keep_patient_characteristics)
        if action == "X":
            del ds[tag]
            continue
        if action is not None:
            _apply(elem, action, key)
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                _clean(item, key, keep_patient_characteristics)


def _apply(elem: DataElement, action: str, key: bytes) -> None:
    if action == "U":
        values = [remap_uid(str(v), key) for v in _as_list(elem.value)]
        elem.value = values[0] if len(values) == 1 else values
    elif elem.VR == "SQ":
        elem.value = Sequence()
    elif action == "Z":
        elem.value = None
    else:  # D
        elem.value = _DUMMY.get(elem.VR, _TEXT_DUMMY if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE") else None)


def _clean_descriptors(ds: Dataset, tokens: set[str]) -> None:
    """Clean Descriptors Option, done the safe way: a descriptor naming anything identifying is removed whole."""
    for keyword in CLEAN_DESCRIPTORS:
        text = str(ds.get(keyword, "") or "").lower()
        if text and (set(_TOKEN_SPLIT.split(text)) & tokens or any(t in text for t in tokens if len(t) >= 6)):
            del ds[keyword]


def _identifying_tokens(values: set[str]) -> set[str]:
    """Words a descriptor must not contain; UIDs, decimals and short numbers are left out, as they match by chance."""
    words = {v.lower() for v in values if not _DOTTED_NUMBER.match(v)}
    candidates = words.union(*(_TOKEN_SPLIT.split(w) for w in words))
    return {t for t in candidates if len(t) >= (4 if t.isdigit() else 3)}


def _subject_source(ds: Dataset) -> str:
    """One patient stays one subject: the pseudonym comes from the ID, else the name, else the study."""
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return value
    return ""


def _mark(ds: Dataset, keep_patient_characteristics: bool) -> None:
    methods, codes = list(_METHOD), list(_METHOD_CODES)
    if keep_patient_characteristics:
        methods.insert(1, _CHARACTERISTICS_METHOD)
        codes.insert(1, _CHARACTERISTICS_CODE)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = methods
    ds.DeidentificationMethodCodeSequence = Sequence([_code(value, meaning) for value, meaning in codes])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _file_meta(original: Dataset, ds: Dataset) -> FileMetaDataset:
    """A fresh meta header: the source's AE titles and implementation names stay behind."""
    old = getattr(original, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", old.get("MediaStorageSOPClassUID", ""))
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    syntax = old.get("TransferSyntaxUID") or _syntax_from_encoding(original)
    if syntax:
        meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _syntax_from_encoding(ds: Dataset) -> str | None:
    """A raw dataset (no meta header) read with force=True still says how it was encoded; pixel decoding needs it."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _values(elem: DataElement) -> Iterator[str]:
    """The text values of an element, nested ones included; binary and binary-number VRs have none."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            for sub in item:
                yield from _values(sub)
        return
    if elem.VR in _BINARY_VRS:
        return
    for value in _as_list(elem.value):
        if value is None or isinstance(value, bytes | bytearray):
            continue
        text = str(value).strip()
        if text:
            yield text


def _as_list(value: object) -> list:
    """Multi-valued elements as a list; a single value (a PersonName too, though it iterates) as one item."""
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]
