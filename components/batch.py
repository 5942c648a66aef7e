"""Batch prediction over files and folders, with the registry's champion or a local model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.errors import DataError, TumorScopeError
from components.imaging import IMAGE_SUFFIXES, list_images, read_slice
from components.model import Classifier

BATCH = 64


def load_classifier(model: str) -> Classifier:
    """``champion`` (or any alias) from the MLflow registry, or a folder holding model.pt + model.json."""
    if Path(model).is_dir():
        return Classifier.load(Path(model))
    from components.config import load_params
    from components.registry import client, load_version, version_by_alias

    name = load_params().register_.model_name
    version = version_by_alias(client(), name, model)
    if version is None:
        raise TumorScopeError(f"registry: {name} has no alias '{model}' (run the pipeline, or pass --model <folder>)")
    return load_version(version)


def expand(inputs: list[Path]) -> list[Path]:
    files = []
    for path in inputs:
        if path.is_dir():
            files += list_images(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.exists():
            files.append(path)
        else:
            raise DataError(path, "not an image file (png, jpg, tif) or folder")
    if not files:
        raise TumorScopeError("no images found in the given inputs")
    return files


def predict_files(inputs: list[Path], model: str = "champion") -> pd.DataFrame:
    from rich.progress import track

    classifier = load_classifier(model)
    files = expand(inputs)
    classes = classifier.spec.classes
    parts = []
    for start in track(range(0, len(files), BATCH), description="predicting"):
        chunk = files[start : start + BATCH]
        probabilities = classifier.predict_proba([read_slice(path) for path in chunk])
        part = pd.DataFrame({"path": [str(p) for p in chunk], "predicted_label": np.asarray(classes)[probabilities.argmax(1)]})
        part["confidence"] = probabilities.max(1)
        for index, name in enumerate(classes):
            part[f"prob_{name}"] = probabilities[:, index]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
