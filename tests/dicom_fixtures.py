"""DICOM test series with planted identifiers, built from pydicom's bundled MR_small.dcm (offline).

Every value in ``PHI`` must be gone after de-identification; the tests scan for them.
The slices are numbered in true order (InstanceNumber, position) but written under
shuffled neutral file names, and each slice has its own intensity offset, so a wrong
sort shows up in the pixels.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import MRImageStorage, generate_uid

Z_STEP = 2.0
PIXEL_SPACING = 0.3125
SLICE_OFFSET = 500  # added per slice index to the base pixels
FIRST_POSITION = (-83.9063, -91.2, 6.6406)  # MR_small's own ImagePositionPatient


def fixed_uid(*parts: str) -> str:
    """Deterministic UIDs, so that failures reproduce."""
    return generate_uid(entropy_srcs=["tumorscope-tests", *parts])


STUDY_UID = fixed_uid("study")
SERIES_UID = fixed_uid("series")
FRAME_UID = fixed_uid("frame")

PHI: dict[str, str] = {
    "PatientName": "Doe^Janeway^Q",
    "PatientID": "MRN-9988776",
    "PatientBirthDate": "19610203",
    "OtherPatientIDs": "OLD-1122334",
    "PatientAddress": "22 Private Lane, Hometown",
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Example Road, Exampletown",
    "ReferringPhysicianName": "Housewright^Gregory",
    "PerformingPhysicianName": "Cuddy^Lisa",
    "AccessionNumber": "ACC-5544332",
    "StudyID": "STUDY-778899",
    "StudyDate": "20240115",
    # with its fraction: six digits alone turn up by chance in the microseconds of Prefect's timestamps
    "StudyTime": "093512.271828",
    "OperatorsName": "Tech^Tom",
    "StationName": "MRI-ROOM-7",
    "DeviceSerialNumber": "SN-4455667",
    "StudyInstanceUID": STUDY_UID,
    "SeriesInstanceUID": SERIES_UID,
    "FrameOfReferenceUID": FRAME_UID,
}
PRIVATE_CREATOR = "ACME 1.1"


def write_series(
    folder: Path,
    n_slices: int = 6,
    series_uid: str | None = None,
    patient_id: str = PHI["PatientID"],
    burned_in: bool = False,
    shuffle: bool = True,
    description: str = "AX FLAIR",
    sex: str | None = "F",
    age: str | None = "045Y",
    positions: list[float] | None = None,
    rescale: tuple[float, float] | None = None,
    modality: str = "MR",
) -> list[Path]:
    """Write one series into ``folder`` as IM0001... (numbering continues after files already there).

    ``positions`` overrides the z of each slice (default: steps of ``Z_STEP`` mm);
    ``rescale`` sets (RescaleSlope, RescaleIntercept). Returns the paths in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or SERIES_UID
    zs = positions or [FIRST_POSITION[2] + Z_STEP * k for k in range(n_slices)]
    order = list(range(len(zs)))
    if shuffle:
        random.Random(f"{series_uid}-{len(zs)}").shuffle(order)
    first = len(list(folder.iterdir())) + 1
    paths: list[Path] = [Path()] * len(zs)
    for number, k in enumerate(order, start=first):
        ds = _slice(k, zs[k], series_uid, patient_id, burned_in, description, sex, age, rescale)
        ds.Modality = modality
        paths[k] = folder / f"IM{number:04d}"
        ds.save_as(paths[k], enforce_file_format=True)
    return paths


def base_pixels() -> np.ndarray:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int16)


def write_zip(zip_path: Path, folder: Path) -> Path:
    """Zip everything under ``folder``, keeping relative names (in a subfolder, as exports often do)."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, f"export/{path.relative_to(folder).as_posix()}")
    return zip_path


def _slice(
    k: int,
    z: float,
    series_uid: str,
    patient_id: str,
    burned_in: bool,
    description: str,
    sex: str | None,
    age: str | None,
    rescale: tuple[float, float] | None,
) -> pydicom.FileDataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientID, ds.SeriesInstanceUID = patient_id, series_uid
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = PHI["StudyDate"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fixed_uid("sop", series_uid, str(k))
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [FIRST_POSITION[0], FIRST_POSITION[1], round(z, 4)]
    ds.SeriesDescription = description
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    _set_or_delete(ds, "PatientSex", sex)
    _set_or_delete(ds, "PatientAge", age)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = (base_pixels() // 4 + SLICE_OFFSET * k).astype(np.int16).tobytes()
    _plant_hidden(ds, series_uid)
    return ds


def _plant_hidden(ds: Dataset, series_uid: str) -> None:
    """Identifiers where a careless de-identifier does not look: private tags, overlays, nested sequences."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"scanned for {PHI['PatientName']}")
    ds.add_new(0x60000010, "US", 64)  # an overlay plane, group 6000
    ds.add_new(0x60000022, "LO", f"marks for {PHI['PatientID']}")
    instance = Dataset()
    instance.ReferencedSOPClassUID = MRImageStorage
    instance.ReferencedSOPInstanceUID = fixed_uid("sop", series_uid, "0")
    instance.PerformingPhysicianName = PHI["PerformingPhysicianName"]
    instance.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", PHI["PatientName"])
    referenced = Dataset()
    referenced.SeriesInstanceUID = series_uid
    referenced.ReferencedInstanceSequence = Sequence([instance])
    ds.ReferencedSeriesSequence = Sequence([referenced])


def _set_or_delete(ds: Dataset, keyword: str, value: str | None) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
