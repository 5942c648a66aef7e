"""Ingest: a data folder in, one manifest row per image out.

Layouts (``ingest.format``, or ``auto`` to detect):

- ``folders``: ``<root>/<label>/*.png|jpg|tif`` (the public Kaggle sets), optionally under
  ``Training/`` and ``Testing/``, with an optional ``<root>/metadata.csv`` (``file`` relative to
  root, and any of ``subject_id, age, sex, site, lesion_mm, mask``).
- ``lgg``: the LGG / kaggle_3m layout, ``<root>/<study>/<study>_<n>.tif|png`` with
  ``<study>_<n>_mask.tif|png`` and ``<root>/data.csv``. A slice is ``tumor`` when its mask has any
  foreground; the patient is the first 12 characters of the study; clinical columns are joined.

Subjects and images leave this stage only as keyed pseudonyms. Unreadable files
are quarantined with their reason, not fatal; the validate stage decides whether
there are too many.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import LABEL_CONFLICT, NO_TUMOUR, QUARANTINE_COLUMNS, TUMOUR, TUMOUR_TYPES, UNREADABLE, IngestConfig, load_params
from components.dedup import duplicate_groups, label_conflicts, thumbnail
from components.errors import DataError
from components.imaging import IMAGE_SUFFIXES, code_version, file_signature, list_images, portable_path, read_slice, slice_stats
from components.privacy import pseudonym
from components.scans import has_dicom_preamble
from components.settings import get_settings
from components.stage import track

SPLIT_FOLDERS = {"training": "train", "testing": "test"}
NOT_A_CLASS = {"masks", "mask", "volumes"}
METADATA_COLUMNS = ("age", "sex", "site", "lesion_mm")
LGG_CLINICAL = "data.csv"
LGG_SLICE_NUMBER = re.compile(r"_(\d+)$")  # <study>_<n>
DICOM_CLASS_FOLDERS = {NO_TUMOUR, TUMOUR, *TUMOUR_TYPES}
CONSTANT_STD = 1e-6


@dataclass
class Entry:
    """One image found by an adapter, before it is read."""

    path: Path
    relative: str
    label: str | None = None
    label_from_folder: bool = False  # a class folder's name: a reader's label per image (not derived from a mask)
    subject: str | None = None
    mask: Path | None = None
    source_split: str = ""
    extra: dict = field(default_factory=dict)
    error: str | None = None  # an adapter's reason to quarantine this item without reading it


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
            if child.is_dir() and not child.name.startswith(".") and child.name.lower() not in NOT_A_CLASS and list_images(child):
                found.append((child, split))
    if not found:
        raise DataError(root, "no class folders with images found (expected <root>/<label>/*.png|jpg|tif)")
    return found


def _read_csv(path: Path, required: str, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV whose identifier columns stay text (subject 0101 is not subject 101)."""
    try:
        table = pd.read_csv(path, dtype={column: str for column in text_columns})
    except FileNotFoundError:
        raise DataError(path, "not found") from None
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text: save it as UTF-8 (in Excel: 'CSV UTF-8')") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc.__class__.__name__})") from None
    if required not in table.columns:
        raise DataError(path, f"needs a '{required}' column")
    return table


def folder_entries(root: Path, config: IngestConfig) -> list[Entry]:
    metadata_file = root / "metadata.csv"
    metadata = _folder_metadata(metadata_file) if metadata_file.exists() else None
    entries = []
    for folder, split in find_class_folders(root):
        for path in list_images(folder):
            relative = str(path.relative_to(root))
            entry = Entry(path, relative, label=folder.name, label_from_folder=True, source_split=split or "")
            if metadata is not None and relative in metadata.index:
                row = metadata.loc[relative]
                entry.subject = row.get("subject_id") if pd.notna(row.get("subject_id")) else None
                entry.mask = root / row["mask"] if isinstance(row.get("mask"), str) else None
                entry.extra = {column: row[column] for column in METADATA_COLUMNS if column in row.index}
            entries.append(entry)
    if metadata is not None:
        _warn_unmatched(metadata_file, metadata.reset_index(), set(metadata.index) - {entry.relative for entry in entries})
    return entries


def _folder_metadata(path: Path) -> pd.DataFrame:
    """metadata.csv indexed by file. A file on two rows is refused: which subject it belongs to decides which split
    it may join, so the table must say it once."""
    table = _read_csv(path, "file", ("file", "subject_id", "mask"))
    repeated = table["file"][table["file"].duplicated()].unique()
    if len(repeated):  # named by line, not by file name: names can carry a patient's
        raise DataError(
            path, f"{len(repeated)} file(s) on more than one row, e.g. on lines {_lines(table, {repeated[0]})}: one row per image"
        )
    return table.set_index("file")


def _warn_unmatched(path: Path, table: pd.DataFrame, unmatched: set[str]) -> None:
    """Rows naming no image found: their subject IDs group nothing, so a misspelt path would let that image's
    subject reach two splits. Said once, by line (file names can carry a patient's)."""
    if unmatched:
        print(
            f"warning: {path}: {len(unmatched)} row(s) name no image under a class folder (lines {_lines(table, unmatched)}); an image misspelt there is its own subject"
        )


def _lines(table: pd.DataFrame, files: set[str], shown: int = 5) -> str:
    """The CSV line numbers (header = line 1) of the rows naming these files, the first few."""
    lines = [str(number + 2) for number, name in enumerate(table["file"]) if name in files]
    return ", ".join(lines[:shown]) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")


def _is_mask(path: Path) -> bool:
    return path.stem.endswith("_mask")


def lgg_entries(root: Path, config: IngestConfig) -> list[Entry]:
    """Slices with a sibling ``_mask`` file; label from the mask, clinical columns from data.csv. Each study is one
    volume: its slices carry its pseudonym and their number in it (``volume_id``, ``slice_index``), as the slices
    cut from NIfTI and DICOM volumes do, so a slice's neighbours can be found."""
    clinical = _read_csv(root / LGG_CLINICAL, "Patient", ("Patient",)).set_index("Patient")
    key = get_settings().secret_key()
    entries = []
    for study in sorted(p for p in root.iterdir() if p.is_dir()):
        masks = {p.stem.removesuffix("_mask"): p for p in study.iterdir() if _is_mask(p) and p.suffix.lower() in IMAGE_SUFFIXES}
        patient = study.name[:12]
        row = clinical.loc[patient] if patient in clinical.index else None
        extra = (_lgg_demographics(row) if row is not None else {}) | {"volume_id": pseudonym(f"volume:{study.name}", key, "vol-")}
        for path in sorted(study.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not _is_mask(path):
                number = LGG_SLICE_NUMBER.search(path.stem)
                where = {"slice_index": int(number[1]) if number else None}
                entries.append(Entry(path, str(path.relative_to(root)), subject=patient, mask=masks.get(path.stem), extra=extra | where))
    if not entries:
        raise DataError(root, "no LGG study folders with slices found (expected <root>/<study>/<study>_<n>.tif|png)")
    return entries


def nifti_entries(root: Path, config: IngestConfig) -> list[Entry]:
    from components.volumes import find_cases

    return volume_entries(find_cases(root), config)


def dicom_entries(root: Path, config: IngestConfig) -> list[Entry]:
    """Every DICOM series becomes a de-identified single-sequence volume case (see components/dicom.py);
    ``<root>/<label>/...`` folders named after a known class label the series."""
    from components.dicom import read_series, write_nifti
    from components.volumes import VolumeCase

    key = get_settings().secret_key()
    cases, entries = [], []
    for source, label in _dicom_sources(root):
        series_list, problems = read_series(source, key)
        base = source if source.is_dir() else source.parent
        entries += [
            Entry(base / name, str((base / name).relative_to(root)) if root.is_dir() else name, error=problem) for name, problem in problems
        ]
        for series in series_list:
            nifti = config.cache_root / "dicom" / f"{series.uid_pseudonym}.nii.gz"
            if not nifti.exists():
                nifti.parent.mkdir(parents=True, exist_ok=True)
                write_nifti(series, nifti)
            sequence = series.sequence if series.sequence != "unknown" else "image"
            extra = {"modality": series.modality, "age": series.age, "sex": series.sex}
            cases.append(VolumeCase(series.uid_pseudonym, {sequence: nifti}, label=label, subject=series.subject, extra=extra))
    return entries + volume_entries(cases, config)


def _dicom_sources(root: Path) -> list[tuple[Path, str | None]]:
    if root.is_file():
        return [(root, None)]
    labelled = [child for child in sorted(root.iterdir()) if child.is_dir() and child.name.lower() in DICOM_CLASS_FOLDERS]
    if not labelled:
        return [(root, None)]
    return [(child, child.name.lower()) for child in labelled]


def volume_entries(cases: list, config: IngestConfig) -> list[Entry]:
    """Preprocess each case (cached), write its volume and its labelled slices under ``derived_dir``,
    and list the volumes in ``derived_dir/volumes.csv`` for 3D use."""
    from components.volumes import axial_slices, load_or_prepare

    key = get_settings().secret_key()
    cache_dir = config.cache_root / "volumes"
    entries, volumes = [], []
    for case in track(cases, sys.stdout.isatty(), "preprocessing volumes"):
        volume_id = pseudonym(f"volume:{case.case}", key, "vol-")
        try:
            prepared = load_or_prepare(case, config.volume, cache_dir)
        except DataError as exc:
            entries.append(Entry(Path(str(exc.path)), case.case, error=exc.problem))
            continue
        slices = axial_slices(prepared, config.volume, case.label)
        volume_path, slice_paths = _write_volume_outputs(case, prepared, slices, volume_id, config)
        columns = _volume_columns(prepared, volume_id) | case.extra
        for piece, png in zip(slices, slice_paths):
            extra = columns | {"slice_index": piece.index, "lesion_mm2": piece.lesion_mm2}
            entries.append(Entry(png, f"{case.case}/z{piece.index:03d}", label=piece.label, subject=case.subject or case.case, extra=extra))
        volumes.append(
            {**columns, "subject": pseudonym(case.subject or case.case, key, "sub-"), "label": case.label or "", "path": portable_path(volume_path),
             "shape": "x".join(map(str, prepared.image.shape[1:])), "has_segmentation": prepared.segmentation is not None,
             "slices": len(slices), "tumor_slices": sum(s.label == TUMOUR for s in slices)}
        )  # fmt: skip
    config.derived_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(volumes)
    table.to_csv(config.derived_dir / "volumes.csv", index=False)
    unlabelled = int((table["slices"] == 0).sum()) if len(table) else 0
    print(f"{len(table)} volumes preprocessed into {config.derived_dir / 'volumes.csv'}; {unlabelled} without slice labels (3D use only)")
    return entries


def _write_volume_outputs(case, prepared, slices: list, volume_id: str, config: IngestConfig) -> tuple[Path, list[Path]]:
    """The derived NIfTI and slice PNGs, written only when absent or made by other inputs (a stamp of the
    preprocessing cache key says which), so a rerun neither recompresses volumes nor touches unchanged slices."""
    from PIL import Image

    from components.volumes import cache_key, save_nifti

    volume_path = config.derived_dir / "volumes" / f"{volume_id}.nii.gz"
    slice_dir = config.derived_dir / "slices" / volume_id
    slice_paths = [slice_dir / f"z{piece.index:03d}.png" for piece in slices]
    stamp_file, stamp = slice_dir / ".stamp", cache_key(case, config.volume, code_version("components.volumes"))
    if stamp_file.exists() and stamp_file.read_text() == stamp and volume_path.exists() and all(p.exists() for p in slice_paths):
        return volume_path, slice_paths
    save_nifti(prepared, volume_path)
    slice_dir.mkdir(parents=True, exist_ok=True)
    for piece, png in zip(slices, slice_paths):
        Image.fromarray(piece.rgb).save(png)
    stamp_file.write_text(stamp)
    return volume_path, slice_paths


def _volume_columns(prepared, volume_id: str) -> dict:
    """QC columns every volume slice carries: geometry before and after preprocessing."""
    spacing = prepared.spacing
    return {
        "volume_id": volume_id,
        "sequences": "+".join(prepared.sequences),
        "channels": len(prepared.sequences),
        "spacing_x": round(spacing[0], 4),
        "spacing_y": round(spacing[1], 4),
        "spacing_z": round(spacing[2], 4),
        "source_orientation": prepared.source_orientation,
        "source_spacing": "x".join(f"{v:g}" for v in prepared.source_spacing),
    }


def _lgg_demographics(row: pd.Series) -> dict:
    """Age, sex and every other clinical column; data.csv's gender codes (1/2) are undocumented,
    so sex stays a code (``code-1``) rather than a guess at F/M."""
    gender = row.get("gender")
    demographics = {"age": row["age_at_initial_pathologic"], "sex": f"code-{int(gender)}" if pd.notna(gender) else None}
    return demographics | {f"clinical_{name}": value for name, value in row.items() if name != "age_at_initial_pathologic"}


def _from_source(entry: Entry) -> Entry:
    entry.extra.setdefault("origin", "source")
    return entry


def feedback_entries(config: IngestConfig) -> list[Entry]:
    """Clinician-labelled served slices (the feedback stage's class folders), marked for training only."""
    folder = config.feedback_dir
    if folder is None or not folder.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
        return []
    entries = folder_entries(folder, config)
    for entry in entries:
        entry.relative = f"feedback/{entry.relative}"
        entry.extra["origin"] = "feedback"
    return entries


ADAPTERS = {"folders": folder_entries, "lgg": lgg_entries, "nifti": nifti_entries, "dicom": dicom_entries}


def detect_format(root: Path) -> str:
    if root.is_file() and root.suffix.lower() == ".zip":
        return "dicom"
    if not root.is_dir():
        raise DataError(root, "not a folder")
    if (root / LGG_CLINICAL).exists() and any(_is_mask(p) for p in root.glob("*/*")):
        return "lgg"
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if any(p.name.lower().endswith((".nii", ".nii.gz")) for p in files) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return "nifti"
    if files and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files) and any(has_dicom_preamble(p) for p in files[:50]):
        return "dicom"
    return "folders"


def _label_from_mask(entry: Entry) -> str:
    if entry.mask is None:
        raise DataError(entry.relative, "no mask file next to this slice, so its label is unknown")
    return TUMOUR if read_slice(entry.mask).max() > 0 else NO_TUMOUR


class PixelCache:
    """What reading an image yields (statistics, thumbnail, mask label), keyed on the file's path, size and
    modification time, so a rerun over unchanged files reads none of them again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple] = {}
        if path.exists():
            try:
                with np.load(path, allow_pickle=True) as stored:
                    self.entries = stored["entries"].item()
            except (OSError, ValueError, KeyError):
                self.entries = {}  # an unreadable cache is only a slower run

    @staticmethod
    def key(entry: Entry) -> str:
        files = [entry.path, *([entry.mask] if entry.mask else [])]
        return "|".join(file_signature(f) for f in files)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(self.path, entries=np.array(self.entries, dtype=object))


def _pixels(entry: Entry, cache: PixelCache) -> tuple[dict, np.ndarray, str | None]:
    key = cache.key(entry)
    if key not in cache.entries:
        image = read_slice(entry.path, name=entry.relative)
        mask_label = None if entry.label or entry.mask is None else _label_from_mask(entry)
        cache.entries[key] = (slice_stats(image), thumbnail(image), mask_label)
    return cache.entries[key]


def describe(entry: Entry, key: bytes, cache: PixelCache) -> tuple[dict, np.ndarray]:
    """Manifest record and dedup thumbnail of one image; raises DataError for a bad file."""
    if entry.error:
        raise DataError(entry.relative, entry.error)
    stats, thumb, mask_label = _pixels(entry, cache)
    if stats["std"] < CONSTANT_STD:
        raise DataError(entry.relative, "constant image (every pixel has the same value)")
    record = {
        "image_id": pseudonym(entry.relative, key, "img-"),
        "subject": pseudonym(entry.subject or entry.relative, key, "sub-"),
        "label": entry.label or mask_label or _label_from_mask(entry),
        "path": portable_path(entry.path),
        "mask_path": portable_path(entry.mask) if entry.mask else "",
        "source_split": entry.source_split,
        **stats,
        **entry.extra,
    }
    return record, thumb


def run(config: IngestConfig, progress: bool = False) -> IngestResult:
    root = config.source
    layout = detect_format(root) if config.format == "auto" else config.format
    entries = [_from_source(entry) for entry in ADAPTERS[layout](root, config)] + feedback_entries(config)
    key = get_settings().secret_key()
    source_key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    cache_name = f"ingest-{source_key}-{code_version('components.dedup')}.npz"
    cache = PixelCache(config.cache_root / cache_name)
    records, thumbs, read, quarantined = [], [], [], []
    for entry in track(entries, progress, f"reading {layout} images"):
        try:
            record, thumb = describe(entry, key, cache)
        except DataError as exc:
            quarantined.append(
                {"image_id": pseudonym(entry.relative, key, "img-"), "file": entry.relative, "kind": UNREADABLE, "problem": exc.problem}
            )
            continue
        records.append(record)
        thumbs.append(thumb)
        read.append(entry)
    cache.save()
    if not records:
        raise DataError(root, "no readable images")
    contradicted = _label_conflicts(records, thumbs, read, config.label_conflict_correlation)
    quarantined += [_conflict_row(records[row], read[row], others) for row, others in sorted(contradicted.items())]
    kept = [row for row in range(len(records)) if row not in contradicted]
    if not kept:
        raise DataError(root, "every image has an exact copy with another label")
    manifest = pd.DataFrame([records[row] for row in kept])
    groups = duplicate_groups(
        np.stack([thumbs[row] for row in kept]), config.duplicate_correlation, mirror_correlation=config.mirror_correlation
    )
    manifest["duplicate_group"] = [f"dup-{g}" for g in groups]
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.derived_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, empty for sources of 2D images
    manifest.to_csv(config.out, index=False)
    quarantine.to_csv(config.out.with_name("quarantine.csv"), index=False)
    _print_summary(manifest, quarantine, layout)
    return IngestResult(manifest, quarantine)


def _label_conflicts(
    records: list[dict], thumbs: list[np.ndarray], entries: list[Entry], min_correlation: float | None
) -> dict[int, list[str]]:
    """The rows an exact copy contradicts (``dedup.label_conflicts``), with the other labels, among the images labelled
    by their folder: two slices alike at 32×32 whose masks differ (LGG's, a volume's) disagree rightly. A clinician's
    feedback label that contradicts a source image marks the feedback copy alone: the test split, drawn from the
    source, stays fixed."""
    if min_correlation is None:
        return {}

    def conflicting(rows: list[int]) -> dict[int, list[str]]:
        if len(rows) < 2:
            return {}
        found = label_conflicts(np.stack([thumbs[row] for row in rows]), [records[row]["label"] for row in rows], min_correlation)
        return {rows[k]: others for k, others in found.items()}

    labelled = [row for row, entry in enumerate(entries) if entry.label_from_folder]
    feedback = {row for row in labelled if entries[row].extra.get("origin") == "feedback"}
    contradicted = conflicting([row for row in labelled if row not in feedback])
    if feedback:
        contradicted |= {row: others for row, others in conflicting(labelled).items() if row in feedback}
    return contradicted


def _conflict_row(record: dict, entry: Entry, others: list[str]) -> dict:
    """quarantine.csv's row for an image an exact copy contradicts (the log shows its pseudonym and problem only)."""
    return {
        "image_id": record["image_id"],
        "file": entry.relative,
        "kind": LABEL_CONFLICT,
        "problem": f"labelled {record['label']!r}, but an exact copy of it (as it is or mirrored) is labelled "
        f"{' and '.join(map(repr, others))}: one label is wrong; correct it, or remove one copy",
    }


def _print_summary(manifest: pd.DataFrame, quarantine: pd.DataFrame, layout: str) -> None:
    counts = ", ".join(f"{label} {n}" for label, n in manifest["label"].value_counts().sort_index().items())
    print(
        f"ingested {len(manifest)} images ({layout} layout: {counts}) from {manifest['subject'].nunique()} subjects; "
        f"{manifest['duplicate_group'].nunique()} near-duplicate groups; {len(quarantine)} quarantined"
    )
    # File names can carry patient IDs, so the log names quarantined images by pseudonym only;
    # the quarantine CSV beside the manifest maps them back to files for whoever fixes the data.
    for row in quarantine.head(10).itertuples():
        print(f"  quarantined {row.image_id}: {row.problem} (file listed in quarantine.csv)")


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().ingest, progress=sys.stdout.isatty()))


if __name__ == "__main__":
    main()
