"""One uploaded or listed scan, whatever its format, as the 2D slices the model sees.

A file's kind is read from its bytes, not its name (names lie, and uploads often have none): PNG, JPEG and
TIFF are one slice; NIfTI (``.nii``, or gzipped) and DICOM (one file, or a zip of one series) are volumes,
preprocessed exactly as at ingestion (RAS, spacing, brain mask, z-score) and cut into their brain-bearing
axial slices. DICOM is de-identified on arrival by :mod:`components.dicom`. The volume's answer is its most
suspicious slice's: a tumour seen on any slice is a tumour in the volume.
"""

from __future__ import annotations

import gzip
import io
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.errors import DataError

IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
NIFTI_HEADER_SIZES = (348, 540)  # NIfTI-1 and NIfTI-2 'sizeof_hdr'
ZIP_MAGIC, GZIP_MAGIC = b"PK\x03\x04", b"\x1f\x8b"
KINDS = ("image", "nifti", "dicom")


class UnsupportedInput(DataError):
    """A file that is none of the formats read here (the endpoint answers 415)."""


@dataclass
class Scan:
    kind: str  # image | nifti | dicom
    slices: list[np.ndarray]  # raw 2D slices in [0, 1]
    indices: list[int] = field(default_factory=lambda: [0])  # axial index of each slice in its volume


def _is_nifti_header(head: bytes) -> bool:
    return len(head) >= 4 and any(int.from_bytes(head[:4], order) in NIFTI_HEADER_SIZES for order in ("little", "big"))


def has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file (128 bytes, then 'DICM'): how DICOM files are found whatever their names."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def sniff(data: bytes, name: str = "upload") -> str:
    """The kind of a file from its first bytes (a gzip is opened far enough to see a NIfTI header)."""
    if data[128:132] == b"DICM" or data.startswith(ZIP_MAGIC):  # first: a DICOM preamble may hold a TIFF header
        return "dicom"
    if data.startswith(IMAGE_MAGIC):
        return "image"
    if data.startswith(GZIP_MAGIC):
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(4)
        except (OSError, EOFError, zlib.error):  # zlib.error is not an OSError: a corrupt stream raises it
            raise DataError(name, "a gzip file that cannot be decompressed") from None
        if _is_nifti_header(head):
            return "nifti"
    elif _is_nifti_header(data[:4]) and len(data) >= 352:
        return "nifti"
    raise UnsupportedInput(
        name, "unsupported file type: its content is not a PNG, JPEG or TIFF slice, a NIfTI volume or DICOM (a file or a zip)"
    )


def read_scan(path: Path, key: bytes, name: str = "upload") -> Scan:
    """The slices of one file; errors name it by ``name`` (an upload's path is a server temp file)."""
    return scan_bytes(path.read_bytes(), key, name)


def scan_bytes(data: bytes, key: bytes, name: str = "upload") -> Scan:
    """The slices of a file's bytes (the endpoint also hashes them, so it reads them once)."""
    from components.imaging import read_slice

    if not data:
        raise DataError(name, "the file is empty")
    kind = sniff(data, name)
    if kind == "image":
        return Scan("image", [read_slice(data, name=name, color=True)])
    with tempfile.TemporaryDirectory(prefix="tumorscope-scan-") as folder:
        if kind == "nifti":
            volume_file = Path(folder) / ("volume.nii.gz" if data.startswith(GZIP_MAGIC) else "volume.nii")
            volume_file.write_bytes(data)
            return _volume_scan(volume_file, kind, name)
        return series_scan(_dicom_series(data, key, Path(folder), name), name)


def series_scan(series, name: str) -> Scan:
    """The slices of one de-identified DICOM series: one slice is a 2D image, more are preprocessed as a volume."""
    if series.volume.shape[0] == 1:  # one slice: a 2D image, no volume to preprocess
        return Scan("dicom", [_unit_range(series.volume[0])])
    from components.dicom import write_nifti

    with tempfile.TemporaryDirectory(prefix="tumorscope-series-") as folder:
        return _volume_scan(write_nifti(series, Path(folder) / "series.nii.gz"), "dicom", name)


def _unit_range(pixels: np.ndarray) -> np.ndarray:
    """A DICOM slice's stored values to [0, 1] by its 0.5-99.5 percentiles (DICOM has no fixed display range)."""
    low, high = np.percentile(pixels, [0.5, 99.5])
    return np.clip((pixels - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)


def _dicom_series(data: bytes, key: bytes, folder: Path, name: str):
    """The one de-identified image series in a DICOM file or a zip of one series."""
    from components.dicom import read_series

    source = folder / ("series.zip" if data.startswith(ZIP_MAGIC) else "series")
    if source.suffix == ".zip":
        source.write_bytes(data)
    else:
        source.mkdir()
        (source / "slice.dcm").write_bytes(data)
    series, quarantined = read_series(source, key)
    if not series:
        reasons = "; ".join(sorted({reason for _, reason in quarantined})) or "no image series found"
        raise DataError(name, f"no usable DICOM image series ({reasons})")
    if len(series) > 1:
        raise DataError(name, f"the upload holds {len(series)} image series: send one series per request")
    return series[0]


def _volume_scan(volume_file: Path, kind: str, name: str) -> Scan:
    from components.config import PARAMS_FILE, VolumeConfig, load_params
    from components.volumes import VolumeCase, axial_slices, prepare

    config = load_params().ingest.volume if PARAMS_FILE.exists() else VolumeConfig()
    try:
        volume = prepare(VolumeCase("upload", {"image": volume_file}), config)
    except DataError as exc:
        raise DataError(name, exc.problem) from None  # the temporary path means nothing to the sender
    except (ValueError, RuntimeError, OSError, EOFError, zlib.error) as exc:
        raise DataError(name, f"not a readable {kind} volume ({exc.__class__.__name__})") from None
    slices = axial_slices(volume, config, None, unlabelled=True)
    if not slices:
        raise DataError(name, "no brain-bearing slice found in the volume")
    return Scan(kind, [s.rgb.mean(axis=-1).astype(np.float32) / 255.0 for s in slices], [s.index for s in slices])
