"""Features: radiomic features of every split image, and which of them separate the classes.

The table (one row per image, no file paths: paths can carry patient identifiers)
is an interpretable baseline beside the CNN; the selection report says which
features carry the signal, ranked on the training rows only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import FeaturesConfig, load_params
from components.errors import DataError
from components.imaging import code_version, file_signature, prepare, read_slice
from components.radiomics import FEATURE_NAMES, SELECTION_METHODS, image_features, select_features
from components.stage import track

ID_COLUMNS = ("image_id", "subject", "label", "split")
REQUIRED_COLUMNS = (*ID_COLUMNS, "path")
# Lesion features come from the ground-truth masks: an empty mask *is* the label "no tumour", and a
# served image has no mask. Ranking them would only rediscover the annotation, so they stay in the
# table for analysis but out of the selection.
NOT_SELECTABLE = ("lesion_",)


@dataclass(frozen=True)
class FeaturesResult:
    table: pd.DataFrame
    selection: pd.DataFrame


class FeatureCache:
    """Features already computed, keyed on the image and mask files (path, size, mtime) and every
    setting that changes them, so a rerun over unchanged images reads none of them again."""

    def __init__(self, path: Path, settings: str) -> None:
        self.path, self.settings = path, settings
        self.stored: dict[str, np.ndarray] = {}
        self.used: dict[str, np.ndarray] = {}
        if path.exists():
            try:
                with np.load(path) as stored:
                    self.stored = dict(zip(stored["keys"].tolist(), stored["values"]))
            except (OSError, ValueError, KeyError):
                self.stored = {}  # an unreadable cache is only a slower run

    def key(self, image: Path, mask: Path | None, image_id: str) -> str:
        files = [image, *([mask] if mask else [])]
        if not all(file.exists() for file in files):
            raise DataError(image_id, "image or mask file not found")
        return "|".join([*map(file_signature, files), self.settings])

    def get(self, key: str) -> np.ndarray | None:
        if key in self.stored:
            self.used[key] = self.stored[key]
        return self.used.get(key)

    def put(self, key: str, values: np.ndarray) -> None:
        self.used[key] = values

    def save(self) -> None:
        """Keep only this run's entries, so the cache does not grow with every image ever seen."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.used), dtype=str)
        values = np.array(list(self.used.values()), dtype=np.float64).reshape(len(keys), len(FEATURE_NAMES))
        np.savez(self.path, keys=keys, values=values)


def _mask_path(value: object) -> Path | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        return None
    return Path(str(value))


def read_mask(path: Path, size: int, name: str) -> np.ndarray:
    """A lesion mask at the model's size; nearest neighbour, so it stays binary."""
    from skimage.transform import resize

    mask = read_slice(path, name=f"{name} (mask)")
    return resize(mask, (size, size), order=0, anti_aliasing=False, preserve_range=True) > 0.5


def _features(row: pd.Series, config: FeaturesConfig, cache: FeatureCache) -> np.ndarray:
    image_path, mask_path = Path(str(row["path"])), _mask_path(row.get("mask_path"))
    # errors name the image by its pseudonym: source paths can carry patient IDs (e.g. TCGA folders)
    key = cache.key(image_path, mask_path, row["image_id"])
    cached = cache.get(key)
    if cached is not None:
        return cached
    image = prepare(read_slice(image_path, name=row["image_id"]), config.image_size)
    mask = read_mask(mask_path, config.image_size, row["image_id"]) if mask_path else None
    values = np.array(list(image_features(image, mask, config.levels).values()), dtype=np.float64)
    cache.put(key, values)
    return values


def read_split(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(path, "split not found: run the split stage first")
    split = pd.read_csv(path, dtype={"image_id": str, "subject": str, "label": str, "path": str, "mask_path": str})
    missing = [column for column in REQUIRED_COLUMNS if column not in split.columns]
    if missing:
        raise DataError(path, f"missing columns: {', '.join(missing)}")
    if split.empty:
        raise DataError(path, "no images")
    return split


def feature_table(split: pd.DataFrame, config: FeaturesConfig, progress: bool = False) -> pd.DataFrame:
    settings = f"size={config.image_size}:levels={config.levels}:code={code_version('components.radiomics')}"
    cache = FeatureCache(config.out.parent / "cache" / "features.npz", settings)
    rows = [_features(row, config, cache) for _, row in track(list(split.iterrows()), progress, "radiomics")]
    cache.save()
    features = pd.DataFrame(np.vstack(rows), columns=list(FEATURE_NAMES), index=split.index)
    return pd.concat([split[list(ID_COLUMNS)], features], axis=1).reset_index(drop=True)


def select(table: pd.DataFrame, config: FeaturesConfig) -> pd.DataFrame:
    # Ranked on training rows only: choosing features by how well they separate val/test labels
    # would leak those labels into every model built on the selection and bias its evaluation.
    train = table[table["split"] == "train"]
    if train["label"].nunique() < 2:
        raise DataError(config.split, f"the train rows hold {train['label'].nunique()} label(s): ranking features needs two or more")
    columns = [name for name in FEATURE_NAMES if not name.startswith(NOT_SELECTABLE)]
    return select_features(train[columns], train["label"], config.top_k, config.seed)


def write_reports(table: pd.DataFrame, selection: pd.DataFrame, config: FeaturesConfig) -> None:
    config.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(config.out, index=False)
    config.report_dir.mkdir(parents=True, exist_ok=True)
    selection.to_csv(config.report_dir / "selection.csv", index=False)
    chosen = selection.loc[selection["selected"], "feature"].tolist()
    summary = {"features": chosen, "top_k": config.top_k, "methods": list(SELECTION_METHODS)}
    (config.report_dir / "selected.json").write_text(json.dumps(summary, indent=2) + "\n")


def run(config: FeaturesConfig, progress: bool = False) -> FeaturesResult:
    split = read_split(config.split)
    table = feature_table(split, config, progress)
    selection = select(table, config)
    write_reports(table, selection, config)
    top = ", ".join(selection["feature"].head(5))
    n_train = int((table["split"] == "train").sum())
    print(f"features: {len(table)} images × {len(FEATURE_NAMES)} features; ranked {len(selection)} on {n_train} train images; top 5: {top}")
    return FeaturesResult(table, selection)


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().features, progress=sys.stdout.isatty()))


if __name__ == "__main__":
    main()
