"""The thin shell around every ``python -m components.<stage>`` entry."""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.errors import TumorScopeError
from components.settings import apply_runtime_env

EXIT_DATA_ERROR = 2
ERROR_MARK = "tumorscope: error:"


def file_hash(path: Path) -> str:
    """A stage input's version, recorded with what the stage made from it: a later stage refuses another version."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def track(items, progress: bool, description: str, total: int | None = None):
    """``items``, with a rich progress bar when a person is watching (a TTY), plain otherwise."""
    if not progress:
        return items
    from rich.progress import track as rich_track

    return rich_track(items, total=total, description=description)


def run_stage(work: Callable[[], Any]) -> None:
    """Run one stage: offline env, quiet logs, and a clear one-line error instead of a traceback.

    Exit code 2 marks an input problem, which retrying cannot fix (the flow reads it).
    """
    apply_runtime_env()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        work()
    except TumorScopeError as exc:
        print(f"{ERROR_MARK} {exc}", file=sys.stderr)
        sys.exit(EXIT_DATA_ERROR)
    print(f"done in {time.perf_counter() - started:.1f} s")
