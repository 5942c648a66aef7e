"""Batch prediction over files and folders, with the registry's champion or a local model."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from components.calibrate import refuse_uncalibrated
from components.errors import DataError, TumorScopeError
from components.imaging import IMAGE_SUFFIXES, list_images, read_slice
from components.model import Classifier

BATCH = 64
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".zip")  # NIfTI volumes and zipped DICOM series


def load_classifier(model: str) -> Classifier:
    """``champion`` (or any alias) from the MLflow registry, or a folder holding model.pt + model.json."""
    if Path(model).is_dir():
        refuse_uncalibrated(Path(model))
        return Classifier.load(Path(model))
    from components.config import load_params
    from components.registry import client, load_version, version_by_alias

    name = load_params().register_.model_name
    version = version_by_alias(client(), name, model)
    if version is None:
        raise TumorScopeError(f"registry: {name} has no alias '{model}' (run the pipeline, or pass --model <folder>)")
    return load_version(version)


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM file in a folder, whatever its name (exports often have none): the suffix, or the Part 10 preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_in(folder: Path) -> list[Path]:
    """The DICOM files under a folder: slices of series, predicted a series at a time (``series_rows``)."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and not _is_volume(p) and _looks_like_dicom(p)
    ]


def expand(inputs: list[Path]) -> list[Path]:
    """Slices and volume files; a folder holding DICOM files stands for its series (``dicom_in``)."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += list_images(path) + sorted(p for p in path.rglob("*") if p.is_file() and _is_volume(p))
            files += [path] if dicom_in(path) else []
        elif not path.exists():
            raise DataError(path, "not found")
        elif path.suffix.lower() in IMAGE_SUFFIXES or _is_volume(path) or _looks_like_dicom(path):
            files.append(path)
        else:
            raise DataError(path, "not an image (png, jpg, tif), a NIfTI volume (.nii, .nii.gz), DICOM (.dcm, .zip) or a folder")
    if not files:
        raise TumorScopeError("no images found in the given inputs")
    return files


def _rows(classifier: Classifier, names: list[str], images: list[np.ndarray]) -> pd.DataFrame:
    classes = classifier.spec.classes
    probabilities = classifier.predict_proba(images)
    labels = classifier.decide(probabilities)  # at the model's operating threshold, as the endpoint answers
    confidence = probabilities[np.arange(len(labels)), [classes.index(label) for label in labels]]
    rows = pd.DataFrame({"path": names, "predicted_label": labels, "confidence": confidence})
    for index, name in enumerate(classes):
        rows[f"prob_{name}"] = probabilities[:, index]
    return rows


def volume_rows(classifier: Classifier, path: Path) -> pd.DataFrame:
    """A volume file's rows (``scan_rows``), preprocessed as at ingestion (DICOM de-identified first)."""
    from components.scans import read_scan
    from components.settings import get_settings

    return scan_rows(classifier, str(path), read_scan(path, get_settings().secret_key(), name=str(path)))


def series_rows(classifier: Classifier, folder: Path, unreadable: list[DataError]) -> list[pd.DataFrame]:
    """Each DICOM series under a folder (grouped by series UID, as ingestion does), named
    ``<folder>#series<SeriesNumber>``; files and series that cannot be used join ``unreadable``."""
    import tempfile

    from components.dicom import read_series
    from components.scans import series_scan
    from components.settings import get_settings

    with tempfile.TemporaryDirectory(prefix="tumorscope-dicom-") as staging:  # the DICOM files alone, not the folder's PNGs
        for path in dicom_in(folder):
            link = Path(staging) / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
        series_list, problems = read_series(Path(staging), get_settings().secret_key())
    unreadable += [DataError(folder / name, problem) for name, problem in problems]
    parts, named = [], [_series_name(folder, series) for series in series_list]
    for series, name in zip(series_list, named):
        name = name if named.count(name) == 1 else f"{name}-{series.uid_pseudonym}"  # two series alike: the pseudonym tells them apart
        try:
            parts.append(scan_rows(classifier, name, series_scan(series, name)))
        except DataError as exc:
            unreadable.append(exc)
    return parts


def _series_name(folder: Path, series) -> str:
    """``<folder of its first file>#series<SeriesNumber>``: where a reader finds it, and the number scanners show."""
    number = series.headers[0].get("SeriesNumber") if series.headers else None
    return f"{(folder / series.first_file).parent}#series{number if number not in (None, '') else ''}"


def scan_rows(classifier: Classifier, name: str, scan) -> pd.DataFrame:
    """One row per brain-bearing axial slice (``<name>#z<index>``), then one row for the volume: the slice with
    the highest tumour probability speaks for it (a tumour seen on any slice is a tumour in the volume)."""
    from components.config import NO_TUMOUR

    rows = _rows(classifier, [f"{name}#z{index:03d}" for index in scan.indices], scan.slices)
    if len(rows) == 1:
        rows["path"] = name
        return rows
    strongest = rows.loc[(1 - rows[f"prob_{NO_TUMOUR}"]).idxmax()].copy()
    strongest["path"] = name
    return pd.concat([rows, strongest.to_frame().T], ignore_index=True)


class BatchPrediction(NamedTuple):
    """The rows of the files that could be read, and each file that could not with its problem: one bad file
    in a folder of thousands costs its own row, not the run."""

    rows: pd.DataFrame
    unreadable: list[DataError]


def predict_files(inputs: list[Path], model: str = "champion") -> BatchPrediction:
    """Slices in batches of ``BATCH``, then each volume file, then each folder's DICOM series."""
    from rich.progress import track

    classifier = load_classifier(model)
    files = expand(inputs)
    slices = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    volumes = [f for f in files if f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES]
    unreadable: list[DataError] = []
    chunks = [slices[start : start + BATCH] for start in range(0, len(slices), BATCH)]
    parts = [_chunk_rows(classifier, chunk, unreadable) for chunk in track(chunks, description="predicting")]
    for path in volumes:
        try:
            parts.append(volume_rows(classifier, path))
        except TumorScopeError as exc:
            unreadable.append(exc if isinstance(exc, DataError) else DataError(path, str(exc)))
    for folder in (f for f in files if f.is_dir()):
        parts += series_rows(classifier, folder, unreadable)
    rows = pd.concat(parts, ignore_index=True) if parts else _rows(classifier, [], [])
    return BatchPrediction(rows, unreadable)


def _chunk_rows(classifier: Classifier, chunk: list[Path], unreadable: list[DataError]) -> pd.DataFrame:
    """The chunk's readable slices, predicted together; the others join ``unreadable``."""
    names, images = [], []
    for path in chunk:
        try:
            images.append(read_slice(path, color=True))
            names.append(str(path))
        except DataError as exc:
            unreadable.append(exc)
    return _rows(classifier, names, images)
