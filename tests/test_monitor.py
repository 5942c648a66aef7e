import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import MonitorConfig
from components.monitor import (
    CATEGORICAL,
    FAILED,
    GATE_REACHED,
    NUMERICAL,
    WORKSPACE_BUSY,
    decide,
    in_cooldown,
    record_retraining,
    retraining_since,
)


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
    recent = [{"time": (now - timedelta(hours=1)).isoformat(), "retraining": GATE_REACHED}]
    old = [{"time": (now - timedelta(hours=7)).isoformat(), "retraining": GATE_REACHED}]
    reference, shifted = _records(rng, 300), _records(rng, 100, shift=0.2)
    held = decide(_config(tmp_path, cooldown_hours=6), reference, shifted, history=recent, now=now)
    assert not held.retrain and any(r.startswith("cooldown") for r in held.reasons)
    assert decide(_config(tmp_path, cooldown_hours=6), reference, shifted, history=old, now=now).retrain


def _history(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "decisions.jsonl").read_text().splitlines()]


def test_a_decision_or_a_refused_retraining_starts_no_cooldown_an_ended_one_does(tmp_path: Path):
    """A decision whose retraining never ran (--no-retrain, or refused by another run holding the workspace) must
    not silence the next check: the drift would go unanswered for cooldown_hours."""
    config, now = _config(tmp_path, cooldown_hours=6), datetime.now(UTC)
    decided = {"time": now.isoformat(), "retrain": True, "reasons": ["drift"], "samples": 100}
    (tmp_path / "decisions.jsonl").write_text(json.dumps(decided) + "\n")
    record_retraining(tmp_path, WORKSPACE_BUSY)
    assert _history(tmp_path)[-1]["retraining"] == WORKSPACE_BUSY and in_cooldown(_history(tmp_path), config, now) is None

    record_retraining(tmp_path, FAILED)  # a stage that fails every time is not rerun every hour
    assert in_cooldown(_history(tmp_path), config, now).startswith("cooldown: the last retraining ended at")

    record_retraining(tmp_path, GATE_REACHED, gate={"candidate_version": "7", "promoted": True, "reasons": ["/data/Doe_Jane.png"]})
    entry = _history(tmp_path)[-1]
    assert entry == {"time": entry["time"], "retraining": GATE_REACHED, "candidate_version": "7", "promoted": True}


def test_a_check_queued_behind_a_retraining_of_the_same_drift_does_not_retrain_again(tmp_path: Path):
    decided = datetime.now(UTC) - timedelta(minutes=40)
    assert retraining_since(tmp_path, decided.isoformat()) is None
    record_retraining(tmp_path, WORKSPACE_BUSY)
    assert retraining_since(tmp_path, decided.isoformat()) is None, "a refused retraining answered nothing"
    record_retraining(tmp_path, GATE_REACHED, gate={"candidate_version": "3", "promoted": False})
    assert retraining_since(tmp_path, decided.isoformat()) == _history(tmp_path)[-1]["time"]
    assert retraining_since(tmp_path, (datetime.now(UTC) + timedelta(minutes=1)).isoformat()) is None


def test_quality_drop_on_feedback_retrains_without_drift(tmp_path: Path):
    rng = np.random.default_rng(3)
    reference, current = _records(rng, 300), _records(rng, 100)
    current["feedback_label"] = np.where(np.arange(100) < 40, np.where(current["predicted_label"] == "tumor", "notumor", "tumor"), None)
    decision = decide(_config(tmp_path, max_accuracy_drop=0.1), reference, current, baseline_accuracy=0.95)
    assert decision.retrain and any("feedback labels 0.000 vs 0.950" in r for r in decision.reasons)


def _labelled_traffic(rng, n: int, miss_at_site: str | None = None) -> pd.DataFrame:
    """Predictions with feedback at sites A and B; ``miss_at_site`` makes the model miss most tumours there."""
    frame = _records(rng, n)
    frame["site"] = np.where(np.arange(n) % 2, "site-A", "site-B")
    frame["feedback_label"] = rng.choice(["notumor", "tumor"], n)
    frame["predicted_label"] = frame["feedback_label"]
    if miss_at_site:
        missed = (frame["site"] == miss_at_site) & (frame["feedback_label"] == "tumor") & (rng.random(n) < 0.6)
        frame.loc[missed, "predicted_label"] = "notumor"
    return frame


def test_a_subgroup_gap_on_feedback_retrains_and_quality_reports_are_written(tmp_path: Path):
    rng = np.random.default_rng(4)
    reference = _records(rng, 300).assign(site=rng.choice(["site-A", "site-B"], 300))
    fair = decide(_config(tmp_path / "fair", max_subgroup_gap=0.25), reference, _labelled_traffic(rng, 120), baseline_accuracy=0.9)
    assert not fair.retrain and fair.subgroup_sensitivity_gap == 0.0
    unfair = decide(
        _config(tmp_path / "unfair", max_subgroup_gap=0.25, max_accuracy_drop=0.5),
        reference,
        _labelled_traffic(rng, 120, "site-B"),
        baseline_accuracy=0.9,
    )
    assert unfair.retrain and unfair.subgroup_sensitivity_gap > 0.25
    assert any(r.startswith("subgroup sensitivity gap on feedback") and "above" in r for r in unfair.reasons)
    assert unfair.feedback_quality["sensitivity"] < 0.9
    for name in ("quality.html", "quality-site-site-A.html", "quality-site-site-B.html", "subgroups.csv"):
        assert (tmp_path / "unfair" / name).exists()


def test_embedding_drift_is_its_own_reason(tmp_path: Path):
    rng = np.random.default_rng(5)
    reference = _records(rng, 300)
    current = _records(rng, 100)
    for i in range(5):
        reference[f"emb_{i}"] = rng.normal(0, 1, 300)
        current[f"emb_{i}"] = rng.normal(1.5, 1, 100)  # the inputs look the same; the network sees something else
    decision = decide(_config(tmp_path), reference, current)
    assert decision.retrain and decision.embedding_drifted_share == 1.0 and decision.drifted_share < 0.5
    assert (tmp_path / "embedding-drift.html").exists()
