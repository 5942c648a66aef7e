"""Benchmark of the data layer on ../shared/data: ingestion (read, QC statistics, dedup thumbnails),
validation and preprocessing, first run versus cached rerun, measured in this one run.

    .venv/bin/python bench/ingest.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data"
SETS = {"masoud-224/Training": "folders", "lgg-kaggle_3m/kaggle_3m": "lgg"}
os.environ.setdefault("TUMORSCOPE_PSEUDONYM_KEY", "bench-key")


def timed(work, *args):
    started = time.perf_counter()
    result = work(*args)
    return time.perf_counter() - started, result


def peak_ingest_memory_gb(source: Path, out: Path) -> float:
    """Peak RSS of a separate process that ingests ``source`` from an empty cache."""
    code = f"from pathlib import Path; from components.config import IngestConfig; from components.ingest import run; run(IngestConfig(source=Path({str(source)!r}), out=Path({str(out)!r})))"
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, cwd=PROJECT)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


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
            config = IngestConfig(source=source, out=Path(tmp) / "manifest.csv")
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
            print(f"peak RSS of a fresh LGG ingestion process: {peak_ingest_memory_gb(lgg, Path(tmp) / 'm.csv'):.2f} GB")


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
