"""DICOM series from a folder or a zip: de-identified headers, a sorted volume and its world affine.

Hospitals export MRI as one file per slice, in any order and under any name, often
zipped, mixed with DICOMDIRs, reports and stray files. This module groups the slices
by series, orders them by their position in space (not by file name), and builds the
voxel-to-world affine NIfTI tools expect.

Every dataset is de-identified (:func:`components.deid.deidentify`) straight after
parsing, before anything else reads it; no original header is kept. A file that cannot
be used is quarantined with its reason and the others go on; a series that cannot be
assembled is quarantined under its pseudonym, never under a patient value.
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pydicom.uid as storage
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from components.deid import deidentify
from components.errors import DataError
from components.imaging import refuse_oversized
from components.privacy import pseudonym

SEQUENCES = ("t1", "t1c", "t2", "flair", "unknown")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 1e-2  # relative spread allowed between consecutive slice gaps
MAX_MEMBER_BYTES = 1 << 30  # a zip member above this is no slice; refuse instead of filling memory
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

_NOT_CONTRAST = re.compile(r"\bpre\b|pre[\s_-]?(contrast|gd|gad)|\bnon[\s_-]?contrast|\bwithout\b|\bnative\b")
_CONTRAST = re.compile(r"\bpost\b|\+\s*c\b|\bc\s*\+|\+\s*gd|\bgd\b|gado|\bcontrast\b|\bce\b|(?<![a-z0-9])t1\s*ce?\b")
_FLAIR = re.compile(r"flair|tirm|dark[\s_-]?fluid")
_T1 = re.compile(r"(?<![a-z0-9])t1|mp[\s_-]?rage|spgr|bravo|tfl3d")
_T2 = re.compile(r"(?<![a-z0-9])t2(?!\s*\*|[\s_-]?star)")
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass
class Series:
    """One de-identified image series, ready to save as NIfTI."""

    uid_pseudonym: str
    subject: str
    modality: str
    sequence: str
    sex: str | None
    age: float | None
    volume: np.ndarray = field(repr=False)  # float32 (z, y, x), slices in spatial order
    affine: np.ndarray = field(repr=False)  # 4x4 voxel (x, y, z) -> RAS+ mm
    spacing: tuple[float, float, float]  # mm along x, y, z
    files: int
    headers: list[Dataset] = field(default_factory=list, repr=False)  # de-identified, pixel data removed
    first_file: str = ""  # the relative name of its first slice's file (where a reader finds the series)


@dataclass
class _Slice:
    name: str
    header: Dataset
    pixels: np.ndarray


def read_series(source: Path, key: bytes) -> tuple[list[Series], list[tuple[str, str]]]:
    """All image series under a folder (recursively) or in a .zip, and the files or series set aside, with why."""
    groups: dict[str, list[_Slice]] = {}
    quarantined: list[tuple[str, str]] = []
    for name, opener in _members(Path(source)):
        try:
            item = _read_slice(name, opener, key)
        except DataError as exc:
            quarantined.append((name, exc.problem))
            continue
        groups.setdefault(str(item.header.SeriesInstanceUID), []).append(item)
    series: list[Series] = []
    for uid, slices in groups.items():
        try:
            series.append(_assemble(pseudonym(uid, key, "ser-"), slices))
        except DataError as exc:
            quarantined.append((exc.path, exc.problem))
    return sorted(series, key=lambda s: (s.subject, s.uid_pseudonym)), quarantined


def write_nifti(series: Series, path: Path) -> Path:
    """Save as NIfTI in scanner (RAS+) space; NIfTI indexes (x, y, z), the volume is stored (z, y, x)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(series.volume.transpose(2, 1, 0)), series.affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(series.affine, code=1)
    image.set_sform(series.affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def guess_sequence(text: str) -> str:
    """The MRI contrast a series description or protocol name names: t1, t1c, t2, flair or unknown."""
    text = text.lower()
    t1 = bool(_T1.search(text))
    if _FLAIR.search(text) and not t1:  # "T1 FLAIR" is T1-weighted
        return "flair"
    if t1:
        return "t1c" if _CONTRAST.search(text) and not _NOT_CONTRAST.search(text) else "t1"
    return "t2" if _T2.search(text) else "unknown"


def parse_age(value: object) -> float | None:
    """A DICOM age string ("045Y", "006M", "010W", "003D") in years; anything else is unknown."""
    match = _AGE.match(str(value or "").strip().upper())
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)] if match else None


def _members(source: Path) -> Iterator[tuple[str, Callable[[], Path | io.BytesIO]]]:
    """(relative name, opener) for every candidate file; DICOMDIR indexes and macOS resource forks are skipped."""
    if not source.exists():
        raise DataError(source, "not found")
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            if path.name.upper() != "DICOMDIR":
                yield path.relative_to(source).as_posix(), lambda path=path: path
    elif zipfile.is_zipfile(source):
        yield from _zip_members(source)
    else:
        raise DataError(source, "expected a folder of DICOM files or a .zip of one")


def _zip_members(source: Path) -> Iterator[tuple[str, Callable[[], Path | io.BytesIO]]]:
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                base = info.filename.rstrip("/").rsplit("/", 1)[-1]
                if info.is_dir() or base.upper() == "DICOMDIR" or info.filename.startswith("__MACOSX/"):
                    continue
                yield info.filename, partial(_open_member, archive, info)
    except zipfile.BadZipFile as exc:
        raise DataError(source, f"not a readable zip archive ({exc})") from None


def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> io.BytesIO:
    """The member's bytes in memory; nothing is extracted to disk."""
    if info.file_size > MAX_MEMBER_BYTES:
        raise DataError(info.filename, f"{info.file_size} bytes: too large for a DICOM slice")
    try:
        return io.BytesIO(archive.read(info))
    except (RuntimeError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:  # encrypted, corrupt or unsupported member
        raise DataError(info.filename, f"cannot be read from the zip ({exc.__class__.__name__})") from None


def _read_slice(name: str, opener: Callable[[], Path | io.BytesIO], key: bytes) -> _Slice:
    header = deidentify(_parse(name, opener), key, name=name)
    if not any(k in header for k in PIXEL_KEYWORDS):
        raise DataError(name, "no pixel data (a DICOM file, but not an image)")
    if "SeriesInstanceUID" not in header:
        raise DataError(name, "no SeriesInstanceUID: the slice cannot be placed in a series")
    pixels = _pixels(name, header)
    for keyword in PIXEL_KEYWORDS:
        if keyword in header:
            delattr(header, keyword)
    return _Slice(name, header, pixels)


def _parse(name: str, opener: Callable[[], Path | io.BytesIO]) -> Dataset:
    """A Part 10 file; or a raw dataset without the 'DICM' preamble, accepted only if it is clearly an image."""
    try:
        return pydicom.dcmread(opener())
    except InvalidDicomError:
        pass
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many kinds on corrupt input
        raise DataError(name, f"not a readable DICOM file ({exc.__class__.__name__})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(opener(), force=True)
            is_image = "SOPClassUID" in ds and "PixelData" in ds
    except Exception:
        is_image = False
    if not is_image:
        raise DataError(name, "not a DICOM file")
    return ds


def _pixels(name: str, header: Dataset) -> np.ndarray:
    """One grey 2D slice in real units (RescaleSlope and RescaleIntercept applied)."""
    if int(header.get("NumberOfFrames") or 1) > 1:
        raise DataError(name, "multi-frame image: not supported, export the series as single-frame slices")
    if int(header.get("SamplesPerPixel") or 1) != 1:
        raise DataError(name, "colour image: expected one grey channel")
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    refuse_oversized(name, columns, rows)
    try:
        array = header.pixel_array
    except Exception as exc:  # truncated data, unsupported compression, bad group 0028 values
        raise DataError(name, f"pixel data cannot be decoded ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    if array.ndim != 2:
        raise DataError(name, f"expected a 2D slice, got pixel array shape {array.shape}")
    slope = float(header.get("RescaleSlope") or 1.0)
    intercept = float(header.get("RescaleIntercept") or 0.0)
    return (array.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _assemble(label: str, slices: list[_Slice]) -> Series:
    _check_modality(label, slices)
    _check_consistent(label, slices)
    row, col = _orientation(slices[0].header)
    normal = np.cross(row, col)
    slices, step, origin = _order(label, slices, normal)
    first = slices[0].header
    dy, dx = _pixel_spacing(first)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, step, origin
    return Series(
        uid_pseudonym=label,
        subject=str(first.PatientID),
        modality=_modality(first),
        sequence=_sequence(first),
        sex=_sex(first),
        age=parse_age(first.get("PatientAge")),
        volume=np.stack([s.pixels for s in slices]).astype(np.float32),
        affine=LPS_TO_RAS @ lps,
        spacing=(round(dx, 6), round(dy, 6), round(float(np.linalg.norm(step)), 6)),  # header precision, not float noise
        files=len(slices),
        headers=[s.header for s in slices],
        first_file=slices[0].name,
    )


def _check_modality(label: str, slices: list[_Slice]) -> None:
    """Only MR series (or ones that do not say) are read: the models learnt brain MRI, and a CT slice, whose
    windowed skull and flat parenchyma they never learnt to tell apart from MRI by the image alone, would get
    a confident answer about something they cannot judge. The header says what the image cannot."""
    modalities = sorted({_modality(s.header) for s in slices} - {"", "MR"})
    if modalities:
        raise DataError(label, f"modality {'/'.join(modalities)[:16]}, not MR: TumorScope reads brain MRI only")


# the storage classes of other modalities, for a file whose Modality tag was stripped (the class UID is kept)
MODALITY_OF_STORAGE_CLASS = {
    storage.CTImageStorage: "CT",
    storage.EnhancedCTImageStorage: "CT",
    storage.LegacyConvertedEnhancedCTImageStorage: "CT",
    storage.PositronEmissionTomographyImageStorage: "PT",
    storage.EnhancedPETImageStorage: "PT",
    storage.NuclearMedicineImageStorage: "NM",
    storage.SecondaryCaptureImageStorage: "OT",
    storage.MRImageStorage: "MR",
    storage.EnhancedMRImageStorage: "MR",
}


def _modality(header: Dataset) -> str:
    """The Modality tag as one upper-case word ("MR"), however it was padded, cased or split into values; without
    the tag, what the storage class says (empty when neither says)."""
    value = header.get("Modality") or ""
    values = value if isinstance(value, MultiValue) else [value]
    stated = "/".join(str(part).strip().upper() for part in values if str(part).strip())
    return stated or MODALITY_OF_STORAGE_CLASS.get(str(header.get("SOPClassUID") or ""), "")


def _check_consistent(label: str, slices: list[_Slice]) -> None:
    shapes = sorted({s.pixels.shape for s in slices})
    if len(shapes) > 1:
        raise DataError(label, f"slices of different sizes (Rows/Columns {', '.join(f'{r}x{c}' for r, c in shapes)})")
    if len({str(s.header.PatientID) for s in slices}) > 1:
        raise DataError(label, "slices of one series name different patients")
    first = np.concatenate(_orientation(slices[0].header))
    if any(not np.allclose(np.concatenate(_orientation(s.header)), first, atol=1e-4) for s in slices):
        raise DataError(label, "slices with different orientations (ImageOrientationPatient)")


def _orientation(header: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (LPS); an image without them is taken as axial."""
    values = header.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]
    cosines = np.asarray([float(v) for v in values], dtype=float)
    return cosines[:3], cosines[3:6]


def _order(label: str, slices: list[_Slice], normal: np.ndarray) -> tuple[list[_Slice], np.ndarray, np.ndarray]:
    """Slices sorted along the normal, the step between them and the first slice's position (all LPS mm)."""
    positions = [s.header.get("ImagePositionPatient") for s in slices]
    if not all(p is not None and len(p) == 3 for p in positions):
        ordered = sorted(slices, key=lambda s: int(s.header.get("InstanceNumber") or 0))
        start = ordered[0].header.get("ImagePositionPatient")
        origin = np.asarray([float(v) for v in start], dtype=float) if start and len(start) == 3 else np.zeros(3)
        return ordered, normal * _thickness(ordered[0].header, "SpacingBetweenSlices", "SliceThickness"), origin
    points = np.asarray([[float(v) for v in p] for p in positions], dtype=float)
    depth = points @ normal
    index = sorted(range(len(slices)), key=lambda i: (depth[i], int(slices[i].header.get("InstanceNumber") or 0)))
    ordered, points, depth = [slices[i] for i in index], points[index], depth[index]
    if len(ordered) == 1:
        return ordered, normal * _thickness(ordered[0].header, "SliceThickness"), points[0]
    _check_gaps(label, np.diff(depth))
    return ordered, (points[-1] - points[0]) / (len(ordered) - 1), points[0]


def _check_gaps(label: str, gaps: np.ndarray) -> None:
    if gaps.min() <= 1e-6:
        raise DataError(label, "several slices at the same position (repeated echoes or time points in one series?)")
    mean = float(gaps.mean())
    if float(np.abs(gaps - mean).max()) > SPACING_TOLERANCE * mean:
        raise DataError(label, f"non-uniform slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm)")


def _thickness(header: Dataset, *keywords: str) -> float:
    """The z step where no neighbouring position gives the real one; 1 mm when the header does not say."""
    for keyword in keywords:
        value = header.get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


def _pixel_spacing(header: Dataset) -> tuple[float, float]:
    """(between rows, between columns) in mm, i.e. (dy, dx); 1 mm when the header does not say."""
    values = header.get("PixelSpacing") or [1.0, 1.0]
    return float(values[0]), float(values[1])


def _sex(header: Dataset) -> str | None:
    value = str(header.get("PatientSex") or "").strip().upper()
    return value if value in ("F", "M") else None


def _sequence(header: Dataset) -> str:
    """The first of description, protocol and sequence name that names a contrast decides."""
    for keyword in ("SeriesDescription", "ProtocolName", "SequenceName"):
        guess = guess_sequence(str(header.get(keyword) or ""))
        if guess != "unknown":
            return guess
    return "unknown"
