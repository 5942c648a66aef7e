import sqlite3
from pathlib import Path

import pandas as pd

from components.predictions import PredictionLog


def test_records_feedback_and_subgroups_round_trip(tmp_path: Path):
    log = PredictionLog(tmp_path / "p.sqlite")
    for i in range(3):
        log.append({"prediction_id": f"p{i}", "time": f"2026-01-0{i + 1}", "predicted_label": "tumor", "sex": "F", "mean": 0.1 * i})
    assert log.add_feedback("p1", "notumor", "2026-02-01")
    assert not log.add_feedback("missing", "tumor", "2026-02-01")
    recent = log.recent(2)
    assert recent["prediction_id"].tolist() == ["p1", "p2"]
    log.append({"prediction_id": "other", "time": "2026-01-09", "model_version": "7"})
    assert log.recent(10, model_version="7")["prediction_id"].tolist() == ["other"]
    assert recent.set_index("prediction_id").loc["p1", "feedback_label"] == "notumor"
    exported = pd.read_parquet(log.export_parquet(tmp_path / "p.parquet"))
    assert len(exported) == 4 and set(exported["sex"].dropna()) == {"F"}


def test_a_log_from_an_older_version_gains_the_new_columns(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE predictions (prediction_id TEXT PRIMARY KEY, time TEXT, predicted_label TEXT)")
        db.execute("INSERT INTO predictions VALUES ('old', '2025-12-31', 'tumor')")
    log = PredictionLog(path)
    log.append({"prediction_id": "new", "time": "2026-01-01", "predicted_label": "notumor", "site": "site-A"})
    assert log.add_feedback("old", "tumor", "2026-01-02")
    assert set(log.recent(10)["prediction_id"]) == {"old", "new"}
