"""Errors a user can act on: they name the file or key and the problem, and print without a traceback."""

from __future__ import annotations

from pathlib import Path


class TumorScopeError(Exception):
    """A problem with the user's input or setup, reported as one clear line."""


class DataError(TumorScopeError):
    """A file that cannot be used, and why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")
