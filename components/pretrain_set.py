"""The pretrain_set stage: the images the pretrain stage trains on, less their copies of the pipeline's own.

Weights pretrained on a copy of a test slice would carry that slice into the test through training's starting
point. A copy is found as ingest finds near-duplicates, by the correlation of 32×32 thumbnails, here between every
pretraining image, as it is and mirrored left-right, and each sequence (and the mean) of every image in the pipeline's
manifest. This catches re-saved, rescaled, re-windowed and mirrored copies of a slice; a cropped, rotated or
re-registered copy, or another slice of the same patient, is not caught. Mirrored images count as copies at the same
threshold, lower than ingest's bar for grouping them (`ingest.mirror_correlation`): leaving a look-alike out of
pretraining costs one image, letting a copy in leaks a test slice.

Its own stage, so that new images in the pipeline's manifest (feedback labels, a new data version) cost only this
check: the pretrain stage depends on the split written here, which stays the same unless the selection changes.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from components.config import IngestConfig, PretrainConfig, load_params
from components.errors import DataError

SELECTION_FILE = "selection.json"


def thumbnails_of(manifest: pd.DataFrame, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every view's thumbnail (components.dedup.views) and the manifest row it is of."""
    from components.dedup import views
    from components.imaging import read_slice

    kept, owner = [], []
    for row, (path, name) in enumerate(zip(manifest["path"], manifest["image_id"])):
        seen = views(read_slice(path, name=name, color=True), mirror)
        kept += seen
        owner += [row] * len(seen)
    return np.stack(kept) if kept else np.zeros((0, 1024), np.float32), np.array(owner, dtype=int)


def copies_of_target(pretraining: pd.DataFrame, target: pd.DataFrame) -> np.ndarray:
    """Per pretraining image, its highest correlation with any view of any target image (-1: a blank image)."""
    from components.dedup import closest_matches

    target_views, _ = thumbnails_of(target)
    own_views, owner = thumbnails_of(pretraining, mirror=True)  # a mirrored copy is a copy
    best = np.full(len(pretraining), -1.0)
    if len(target_views) and len(own_views):
        per_image, _ = closest_matches(target_views, own_views, owner)
        best[: len(per_image)] = per_image
    return best


def pretraining_ingest(config: PretrainConfig, ingest: IngestConfig) -> IngestConfig:
    """The pipeline's own ingest settings (volume preparation, near-duplicate threshold, de-identification) read
    the pretraining source into the pretraining folder, the layout found anew; the pipeline's cache is shared, so
    that it stays out of this stage's DVC output."""
    return ingest.model_copy(update={
        "source": config.source, "format": "auto", "out": config.data_dir / "manifest.csv",
        "derived_dir": config.data_dir / "derived", "feedback_dir": None,
        "cache_dir": ingest.cache_root,
    })  # fmt: skip


def ingest_source(config: PretrainConfig, ingest: IngestConfig) -> pd.DataFrame:
    from components.ingest import run as run_ingest

    if not config.source.exists():
        raise DataError(config.source, "pretrain.source not found")
    return run_ingest(pretraining_ingest(config, ingest)).manifest


def split_for_pretraining(manifest: pd.DataFrame, config: PretrainConfig) -> pd.DataFrame:
    """Train and val, near-duplicate groups whole: the validation figures the run logs are of unseen images."""
    from components.split import hold_out, leakage_groups

    held = hold_out(manifest["label"].to_numpy(), leakage_groups(manifest), config.val_fraction, config.seed)
    return manifest.assign(split=np.where(held, "val", "train"))


def run(config: PretrainConfig, ingest: IngestConfig | None = None) -> dict:
    """Write the pretraining split (no rows when ``pretrain.source`` is unset) and what was left out; ``ingest``:
    the pipeline's ingest section."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.source is None:
        pd.DataFrame(columns=["image_id", "label", "path", "split"]).to_csv(config.split_file, index=False)
        return _record(config, {"images": 0})
    if not config.target.exists():
        raise DataError(config.target, "the pipeline's own manifest is missing: run the ingest stage first")
    manifest = ingest_source(config, ingest or IngestConfig())
    closest = copies_of_target(manifest, pd.read_csv(config.target))
    copies = closest >= config.copy_correlation
    kept = manifest[~copies].reset_index(drop=True)
    if kept["label"].nunique() < 2:
        raise DataError(config.source, f"fewer than two classes left to pretrain on after leaving out {int(copies.sum())} copies")
    print(
        f"pretraining set: {len(manifest)} images; {int(copies.sum())} left out as copies of the pipeline's own images "
        f"(thumbnail correlation >= {config.copy_correlation}; the highest of the rest {closest[~copies].max():.3f})",
        flush=True,
    )
    split_for_pretraining(kept, config).to_csv(config.split_file, index=False)
    return _record(config, {
        "images": len(kept), "left_out_as_copies": int(copies.sum()),
        "highest_correlation_kept": round(float(closest[~copies].max()), 4), "classes": sorted(kept["label"].unique()),
    })  # fmt: skip


def _record(config: PretrainConfig, selection: dict) -> dict:
    (config.data_dir / SELECTION_FILE).write_text(json.dumps(selection, indent=2))
    return selection


def main() -> None:
    from components.stage import run_stage

    def work() -> dict:
        params = load_params()
        return run(params.pretrain, params.ingest)

    run_stage(work)


if __name__ == "__main__":
    main()
