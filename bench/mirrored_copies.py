"""Mirrored copies across a split: how many test slices have a left-right mirrored copy in train or val.

Public slice sets hold mirrored copies (Masoud's: about a thousand). Until ingestion grouped an image with its mirrored
copies, the split could put one in test and the other in train, where training's own flips show the network the
test slice. This ingests a folder as `tumorscope run --data` does, splits it as the split stage does, once with the
grouping before mirrored copies counted (`ingest.mirror_correlation: null`) and once as it is, and counts the test slices with a copy (thumbnail
correlation >= components.config.MIRRORED_COPY once mirrored) in train or val.

    .venv/bin/python bench/mirrored_copies.py --data ../shared/data/masoud-224/Training
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def split_with(data: Path, workspace: Path, mirror_correlation: float | None) -> pd.DataFrame:
    """The split stage's assignment of ``data``, grouped with mirrored copies at ``mirror_correlation`` (None: not)."""
    from components import ingest
    from components.cli import REAL_DATA_DUPLICATE_CORRELATION
    from components.config import IngestConfig, SplitConfig
    from components.split import assign

    config = IngestConfig(
        source=data, out=workspace / "manifest.csv", derived_dir=workspace / "derived", feedback_dir=None,
        duplicate_correlation=REAL_DATA_DUPLICATE_CORRELATION, mirror_correlation=mirror_correlation, cache_dir=workspace / "cache",
    )  # fmt: skip
    ingest.run(config)
    return assign(pd.read_csv(config.out), SplitConfig())


def mirrored_copies_of_test_slices(split: pd.DataFrame) -> pd.Series:
    """Per test slice: whether a mirrored copy of it lies in train or val."""
    from components.dedup import MIRRORED_COPY, mirrored, thumbnail
    from components.imaging import read_slice

    thumbnails = np.stack([thumbnail(read_slice(path, name=name)) for path, name in zip(split["path"], split["image_id"])])
    is_test = (split["split"] == "test").to_numpy()
    similarity = thumbnails[is_test] @ mirrored(thumbnails[~is_test]).T
    return pd.Series((similarity >= MIRRORED_COPY).any(axis=1), index=split.index[is_test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of 2D slices that ingestion reads")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"skipped: {args.data} not found (the shared real data sets are not on this machine)")
    from components.dedup import MIRRORED_COPY

    with tempfile.TemporaryDirectory(prefix="tumorscope-mirrored-") as folder:
        for name, correlation in (("before mirrored copies were grouped", None), ("as ingestion groups now", MIRRORED_COPY)):
            split = split_with(args.data.resolve(), Path(folder), correlation)
            leaked = mirrored_copies_of_test_slices(split)
            test = split.loc[leaked.index]
            by_label = test.loc[leaked, "label"].value_counts().to_dict()
            print(
                f"{name}: {split['duplicate_group'].nunique()} near-duplicate groups; {int(leaked.sum())} of {len(test)} test "
                f"slices have a mirrored copy in train or val ({by_label} of {test['label'].value_counts().to_dict()})",
                flush=True,
            )


if __name__ == "__main__":
    main()
