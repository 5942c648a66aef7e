from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import MonitorConfig
from components.monitor import CATEGORICAL, NUMERICAL, decide


def _records(rng, n: int, shift: float = 0.0) -> pd.DataFrame:
    frame = pd.DataFrame({column: rng.normal(0.3 + shift, 0.05, n) for column in NUMERICAL})
    frame[CATEGORICAL[0]] = rng.choice(["notumor", "tumor"], n)
    return frame


def _config(tmp_path: Path, **overrides) -> MonitorConfig:
    return MonitorConfig(report_dir=tmp_path, min_samples=30, min_feedback=20, **overrides)


def test_no_drift_no_retrain_and_drift_retrains(tmp_path: Path):
    rng = np.random.default_rng(0)
    reference = _records(rng, 300)
    assert not decide(_config(tmp_path), reference, _records(rng, 100)).retrain
    drifted = decide(_config(tmp_path), reference, _records(rng, 100, shift=0.2))
    assert drifted.retrain and "mean" in drifted.drifted_columns
    assert (tmp_path / "drift.html").exists()
    from evidently.ui.workspace import Workspace

    workspace = Workspace.create(str(tmp_path / "evidently-workspace"))
    assert len(workspace.list_runs(workspace.search_project("tumorscope-monitoring")[0].id)) == 2


def test_too_few_predictions_decide_nothing(tmp_path: Path):
    rng = np.random.default_rng(1)
    decision = decide(_config(tmp_path), _records(rng, 300), _records(rng, 10, shift=1.0))
    assert not decision.retrain and "at least 30" in decision.reasons[0]


def test_cooldown_holds_back_a_second_retraining(tmp_path: Path):
    rng = np.random.default_rng(2)
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    recent = [{"time": (now - timedelta(hours=1)).isoformat(), "retrain": True}]
    old = [{"time": (now - timedelta(hours=7)).isoformat(), "retrain": True}]
    reference, shifted = _records(rng, 300), _records(rng, 100, shift=0.2)
    held = decide(_config(tmp_path, cooldown_hours=6), reference, shifted, history=recent, now=now)
    assert not held.retrain and any(r.startswith("cooldown") for r in held.reasons)
    assert decide(_config(tmp_path, cooldown_hours=6), reference, shifted, history=old, now=now).retrain


def test_quality_drop_on_feedback_retrains_without_drift(tmp_path: Path):
    rng = np.random.default_rng(3)
    reference, current = _records(rng, 300), _records(rng, 100)
    current["feedback_label"] = np.where(np.arange(100) < 40, np.where(current["predicted_label"] == "tumor", "notumor", "tumor"), None)
    decision = decide(_config(tmp_path, max_accuracy_drop=0.1), reference, current, baseline_accuracy=0.95)
    assert decision.retrain and any("feedback labels 0.000 vs 0.950" in r for r in decision.reasons)
