"""Batch prediction over files and folders, with the registry's champion or a local model."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from components.calibrate import refuse_uncalibrated
from components.errors import DataError, TumorScopeError
from components.imaging import IMAGE_SUFFIXES, read_slice
from components.model import Classifier
from components.scans import has_dicom_preamble

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


class Inputs(NamedTuple):
    """What the inputs hold: slices, volume files (NIfTI, zipped series, DICOM files named alone), and the DICOM
    files found in each folder, read a series at a time."""

    slices: list[Path]
    volumes: list[Path]
    series_folders: dict[Path, list[Path]]


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or has_dicom_preamble(path)


def expand(inputs: list[Path]) -> Inputs:
    """Each folder is listed once; DICOM files are found whatever their names (exports often have none)."""
    found = Inputs([], [], {})
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            found.slices.extend(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
            found.volumes.extend(p for p in files if _is_volume(p))
            dicom = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and not _is_volume(p) and _is_dicom(p)]
            found.series_folders.update({path: dicom} if dicom else {})
        elif not path.exists():
            raise DataError(path, "not found")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.slices.append(path)
        elif _is_volume(path) or _is_dicom(path):
            found.volumes.append(path)
        else:
            raise DataError(path, "not an image (png, jpg, tif), a NIfTI volume (.nii, .nii.gz), DICOM (.dcm, .zip) or a folder")
    if not (found.slices or found.volumes or found.series_folders):
        raise TumorScopeError("no images found in the given inputs")
    return found


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


def series_rows(classifier: Classifier, folder: Path, dicom: list[Path], unreadable: list[DataError]) -> list[pd.DataFrame]:
    """Each DICOM series among a folder's DICOM files (grouped by series UID, as ingestion does), named
    ``<folder of its first file>#series<SeriesNumber>``; files and series that cannot be used join ``unreadable``."""
    import tempfile

    from components.dicom import read_series
    from components.scans import series_scan
    from components.settings import get_settings

    with tempfile.TemporaryDirectory(prefix="tumorscope-dicom-") as staging:  # the DICOM files alone, not the folder's PNGs
        for path in dicom:
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
    slices, volumes, series_folders = expand(inputs)
    unreadable: list[DataError] = []
    chunks = [slices[start : start + BATCH] for start in range(0, len(slices), BATCH)]
    parts = [_chunk_rows(classifier, chunk, unreadable) for chunk in track(chunks, description="predicting")]
    for path in volumes:
        try:
            parts.append(volume_rows(classifier, path))
        except TumorScopeError as exc:
            unreadable.append(exc if isinstance(exc, DataError) else DataError(path, str(exc)))
    for folder, dicom in series_folders.items():
        parts += series_rows(classifier, folder, dicom, unreadable)
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
