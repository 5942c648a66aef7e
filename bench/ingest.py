"""Benchmark of the data layer on ../shared/data: ingestion (read, QC statistics, dedup thumbnails;
for NIfTI also volume preprocessing), validation, preprocessing and radiomics, first run versus cached
rerun, and the peak memory of ingestion as the data grows, all measured in this one run.

    .venv/bin/python bench/ingest.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data"
SETS = {"masoud-224/Training": "folders", "lgg-kaggle_3m/kaggle_3m": "lgg", "nifti": "nifti"}
os.environ.setdefault("TUMORSCOPE_PSEUDONYM_KEY", "bench-key")


def timed(work, *args):
    started = time.perf_counter()
    result = work(*args)
    return time.perf_counter() - started, result


def peak_ingest_memory_gb(source: Path, out: Path) -> float:
    """Peak RSS of a separate process that ingests ``source`` from an empty cache."""
    code = (
        "import resource; from pathlib import Path; from components.config import IngestConfig; from components.ingest import run; "
        f"run(IngestConfig(source=Path({str(source)!r}), out=Path({str(out)!r}))); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=PROJECT)
    return int(result.stdout.strip().splitlines()[-1]) / 1e6


def lgg_subset(lgg: Path, studies: int, target: Path) -> Path:
    """The first ``studies`` patient folders of LGG (symlinked) with its data.csv."""
    target.mkdir(parents=True)
    (target / "data.csv").symlink_to(lgg / "data.csv")
    for study in sorted(p for p in lgg.iterdir() if p.is_dir())[:studies]:
        (target / study.name).symlink_to(study)
    return target


def radiomics_rates(manifest: Path, tmp: Path) -> tuple[int, float, float]:
    """Images, and the cold and cached durations of the features stage over every image."""
    import pandas as pd

    from components.config import FeaturesConfig
    from components.features import run as features

    split = tmp / "split.csv"
    pd.read_csv(manifest).assign(split="train").to_csv(split, index=False)
    config = FeaturesConfig(split=split, out=tmp / "features.csv", report_dir=tmp / "features")
    cold, result = timed(features, config)
    warm, _ = timed(features, config)
    return len(result.table), cold, warm


def main() -> None:
    from components.config import IngestConfig, ValidateConfig
    from components.dataset import prepared_images
    from components.ingest import run as ingest
    from components.validate import run as validate

    print(
        f"{'data set':28} {'images':>6} {'ingest cold':>12} {'ingest cached':>14} {'ratio':>6} {'prepare cold':>13} {'prepare cached':>15} {'ratio':>6} {'validate':>9}"
    )
    for relative in SETS:
        source = SHARED / relative
        if not source.exists():
            print(f"{relative}: skipped, {source} is absent")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            config = IngestConfig(source=source, out=Path(tmp) / "manifest.csv", derived_dir=Path(tmp) / "derived")
            cold, result = timed(ingest, config)
            warm, _ = timed(ingest, config)
            frame = result.manifest
            prep_cold, _ = timed(prepared_images, frame, 112, Path(tmp) / "prepared")
            prep_warm, _ = timed(prepared_images, frame, 112, Path(tmp) / "prepared")
            check, _ = timed(validate, ValidateConfig(manifest=config.out, report_dir=Path(tmp) / "reports"))
        n = len(frame)
        print(
            f"{relative:28} {n:6d} {n / cold:8.0f} im/s {n / warm:10.0f} im/s {cold / warm:5.1f}x "
            f"{n / prep_cold:9.0f} im/s {n / prep_warm:11.0f} im/s {prep_cold / prep_warm:5.1f}x {check:7.1f} s"
        )
    lgg = SHARED / "lgg-kaggle_3m/kaggle_3m"
    if lgg.exists():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config = IngestConfig(source=lgg, out=tmp / "manifest.csv")
            ingest(config)
            n, cold, warm = radiomics_rates(config.out, tmp)
            print(f"radiomics on LGG: {n} images, {n / cold:.0f} im/s cold, {n / warm:.0f} im/s cached ({cold / warm:.1f}x)")
            half = peak_ingest_memory_gb(lgg_subset(lgg, 20, tmp / "half"), tmp / "half.csv")
            full = peak_ingest_memory_gb(lgg, tmp / "full.csv")
            print(f"peak RSS of a fresh LGG ingestion process: 20 patients {half:.2f} GB, 40 patients {full:.2f} GB ({full / half:.2f}x)")


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
