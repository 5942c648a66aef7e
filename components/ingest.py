"""Ingest: a folder of labelled slices in, one manifest row per image out.

Layout: ``<root>/<label>/*.png|jpg|tif`` (the public Kaggle sets), optionally
under ``Training/`` and ``Testing/``, with an optional ``<root>/metadata.csv``
(``file`` relative to root, and any of ``subject_id, age, sex, site, lesion_mm, mask``).
Subjects and images leave this stage only as keyed pseudonyms. Unreadable files
are quarantined with their reason, not fatal; the validate stage decides whether
there are too many.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import IngestConfig, load_params
from components.dedup import duplicate_groups, thumbnail
from components.errors import DataError, TumorScopeError
from components.imaging import list_images, read_slice, slice_stats
from components.privacy import pseudonym
from components.settings import get_settings

SPLIT_FOLDERS = {"training": "train", "testing": "test"}
NOT_A_CLASS = {"masks", "mask"}
METADATA_COLUMNS = ("age", "sex", "site", "lesion_mm")


@dataclass(frozen=True)
class IngestResult:
    manifest: pd.DataFrame
    quarantined: pd.DataFrame


def find_class_folders(root: Path) -> list[tuple[Path, str | None]]:
    """(class folder, source split) pairs; Training/Testing parents become the source split."""
    if not root.is_dir():
        raise DataError(root, "not a folder")
    parents = [(child, SPLIT_FOLDERS[child.name.lower()]) for child in root.iterdir() if child.name.lower() in SPLIT_FOLDERS]
    found = []
    for parent, split in parents or [(root, None)]:
        for child in sorted(parent.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name.lower() not in NOT_A_CLASS:
                if list_images(child):
                    found.append((child, split))
    if not found:
        raise DataError(root, "no class folders with images found (expected <root>/<label>/*.png|jpg|tif)")
    return found


def _read_metadata(root: Path) -> pd.DataFrame | None:
    path = root / "metadata.csv"
    if not path.exists():
        return None
    try:
        metadata = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc.__class__.__name__})") from None
    if "file" not in metadata.columns:
        raise DataError(path, "needs a 'file' column (image path relative to the data root)")
    return metadata.set_index("file")


def _describe_image(path: Path, root: Path, label: str, split: str | None) -> tuple[dict, np.ndarray]:
    image = read_slice(path, name=str(path.relative_to(root)))
    record = {"label": label, "path": str(path.resolve()), "source_split": split or "", **slice_stats(image)}
    return record, thumbnail(image)


def scan(root: Path, key: bytes, progress: bool = False) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Read every image once: stats and thumbnail for the good ones, the reason for the bad ones."""
    files = [(path, folder.name, split) for folder, split in find_class_folders(root) for path in list_images(folder)]
    records, thumbs, quarantined = [], [], []
    for path, label, split in _track(files, progress, "reading images"):
        relative = str(path.relative_to(root))
        try:
            record, thumb = _describe_image(path, root, label, split)
        except DataError as exc:
            quarantined.append({"file": relative, "problem": exc.problem})
            continue
        record["image_id"] = pseudonym(relative, key, "img-")
        record["relative"] = relative
        records.append(record)
        thumbs.append(thumb)
    return records, thumbs, quarantined


def _attach_metadata(manifest: pd.DataFrame, metadata: pd.DataFrame | None, root: Path, key: bytes) -> pd.DataFrame:
    """Join demographics and masks, then replace subject IDs with pseudonyms."""
    if metadata is not None:
        joined = metadata.reindex(manifest["relative"])
        for column in METADATA_COLUMNS:
            if column in joined.columns:
                manifest[column] = joined[column].to_numpy()
        if "mask" in joined.columns:
            manifest["mask_path"] = [str((root / m).resolve()) if isinstance(m, str) else "" for m in joined["mask"]]
        subjects = joined["subject_id"] if "subject_id" in joined.columns else pd.Series([None] * len(manifest))
    else:
        subjects = pd.Series([None] * len(manifest))
    identity = [s if isinstance(s, str) and s else rel for s, rel in zip(subjects.to_numpy(), manifest["relative"])]
    manifest["subject"] = [pseudonym(value, key, "sub-") for value in identity]
    return manifest


def run(config: IngestConfig, progress: bool = False) -> IngestResult:
    root = config.source
    key = get_settings().secret_key()
    records, thumbs, quarantined = scan(root, key, progress)
    if not records:
        raise DataError(root, "no readable images")
    manifest = _attach_metadata(pd.DataFrame(records), _read_metadata(root), root, key)
    groups = duplicate_groups(np.stack(thumbs), config.duplicate_correlation)
    manifest["duplicate_group"] = [f"dup-{g}" for g in groups]
    manifest = manifest.drop(columns="relative")
    quarantine = pd.DataFrame(quarantined, columns=["file", "problem"])
    config.out.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(config.out, index=False)
    quarantine.to_csv(quarantine_path(config), index=False)
    _print_summary(manifest, quarantine)
    return IngestResult(manifest, quarantine)


def quarantine_path(config: IngestConfig) -> Path:
    return config.out.with_name("quarantine.csv")


def _print_summary(manifest: pd.DataFrame, quarantine: pd.DataFrame) -> None:
    counts = ", ".join(f"{label} {n}" for label, n in manifest["label"].value_counts().sort_index().items())
    groups = manifest["duplicate_group"].nunique()
    print(f"ingested {len(manifest)} images ({counts}); {groups} near-duplicate groups; {len(quarantine)} quarantined")
    for row in quarantine.head(10).itertuples():
        print(f"  quarantined {row.file}: {row.problem}")


def _track(items: list, progress: bool, description: str):
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=description)


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().ingest, progress=sys.stdout.isatty()))


if __name__ == "__main__":
    main()


__all__ = ["run", "scan", "find_class_folders", "IngestResult", "TumorScopeError"]
