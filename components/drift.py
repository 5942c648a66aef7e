"""Drift detection behind a small interface of our own, because Evidently's API moves often.

``DriftDetector(columns).fit(reference).score(current)`` follows the
scikit-learn contract. Evidently runs a per-column test (K-S for numbers,
chi-square for categories by default) and counts drifted columns; the decision
reads that one named metric, ``DriftedColumnsCount``, so the HTML report and
the decision cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class DriftResult:
    drifted_share: float
    drifted_columns: list[str]
    p_values: dict[str, float] = field(default_factory=dict)
    snapshot: object = None

    def save(self, html: Path, json_path: Path) -> None:
        self.snapshot.save_html(str(html))
        self.snapshot.save_json(str(json_path))


def add_snapshot(workspace: Path, project: str, snapshot) -> str:
    """Keep a report as a snapshot in a local Evidently workspace, so `evidently ui` shows the trend."""
    from evidently.ui.workspace import Workspace

    space = Workspace.create(str(workspace))
    found = space.search_project(project)
    target = found[0] if found else space.create_project(project)
    space.add_run(target.id, snapshot, include_data=False)
    return str(target.id)


class DriftDetector:
    def __init__(self, numerical: list[str], categorical: list[str], drift_share: float = 0.5) -> None:
        self.numerical, self.categorical, self.drift_share = numerical, categorical, drift_share
        self.reference: pd.DataFrame | None = None

    def fit(self, reference: pd.DataFrame) -> DriftDetector:
        self.reference = reference[self.numerical + self.categorical].copy()
        return self

    def _dataset(self, frame: pd.DataFrame):
        from evidently import DataDefinition, Dataset

        definition = DataDefinition(numerical_columns=self.numerical, categorical_columns=self.categorical)
        return Dataset.from_pandas(frame[self.numerical + self.categorical], data_definition=definition)

    def score(self, current: pd.DataFrame) -> DriftResult:
        from evidently import Report
        from evidently.presets import DataDriftPreset

        if self.reference is None:
            raise RuntimeError("fit the detector on reference data first")
        # K-S and chi-square at every sample size: Evidently's default switches to distances above 1,000
        # rows, where a high value means drift and the p-value reading below would invert.
        preset = DataDriftPreset(
            columns=self.numerical + self.categorical, drift_share=self.drift_share, num_method="ks", cat_method="chisquare"
        )
        report = Report([preset])
        snapshot = report.run(current_data=self._dataset(current), reference_data=self._dataset(self.reference))
        return _read(snapshot)


def _read(snapshot) -> DriftResult:
    metrics = snapshot.dict()["metrics"]
    count = next(m for m in metrics if m["config"]["type"].endswith("DriftedColumnsCount"))
    p_values, drifted = {}, []
    for metric in metrics:
        if metric["config"]["type"].endswith("ValueDrift"):
            column = metric["config"]["column"]
            p_values[column] = float(metric["value"])
            if metric["value"] < metric["config"]["threshold"]:
                drifted.append(column)
    return DriftResult(float(count["value"]["share"]), drifted, p_values, snapshot)
