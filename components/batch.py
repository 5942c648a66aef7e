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
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".zip")  # NIfTI volumes, DICOM files and zipped series


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


def expand(inputs: list[Path]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir():
            files += list_images(path) + sorted(p for p in path.rglob("*") if p.is_file() and _is_volume(p))
        elif not path.exists():
            raise DataError(path, "not found")
        elif path.suffix.lower() in IMAGE_SUFFIXES or _is_volume(path):
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
    """One row per brain-bearing axial slice (``<file>#z<index>``), preprocessed as at ingestion (DICOM
    de-identified first), then one row for the volume: the slice with the highest tumour probability speaks
    for it (a tumour seen on any slice is a tumour in the volume), so its probabilities are the volume's."""
    from components.config import NO_TUMOUR
    from components.scans import read_scan
    from components.settings import get_settings

    scan = read_scan(path, get_settings().secret_key(), name=str(path))
    rows = _rows(classifier, [f"{path}#z{index:03d}" for index in scan.indices], scan.slices)
    if len(rows) == 1:
        rows["path"] = str(path)
        return rows
    strongest = rows.loc[(1 - rows[f"prob_{NO_TUMOUR}"]).idxmax()].copy()
    strongest["path"] = str(path)
    return pd.concat([rows, strongest.to_frame().T], ignore_index=True)


class BatchPrediction(NamedTuple):
    """The rows of the files that could be read, and each file that could not with its problem: one bad file
    in a folder of thousands costs its own row, not the run."""

    rows: pd.DataFrame
    unreadable: list[DataError]


def predict_files(inputs: list[Path], model: str = "champion") -> BatchPrediction:
    from rich.progress import track

    classifier = load_classifier(model)
    files = expand(inputs)
    slices, volumes = [f for f in files if not _is_volume(f)], [f for f in files if _is_volume(f)]
    unreadable: list[DataError] = []
    chunks = [slices[start : start + BATCH] for start in range(0, len(slices), BATCH)]
    parts = [_chunk_rows(classifier, chunk, unreadable) for chunk in track(chunks, description="predicting")]
    for path in volumes:
        try:
            parts.append(volume_rows(classifier, path))
        except TumorScopeError as exc:
            unreadable.append(exc if isinstance(exc, DataError) else DataError(path, str(exc)))
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
