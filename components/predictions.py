"""The prediction log: every served prediction, without identifiers, for monitoring.

SQLite by default (one file, safe for the endpoint's threads through short-lived
connections). A record holds what drift monitoring compares with the training
reference: raw-image statistics, QC flags, the embedding summary (PCA of the
network's penultimate layer) and the model's output, never a file name.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd

from components.imaging import STAT_COLUMNS
from components.model import EMBEDDING_COLUMNS

SUBGROUP_COLUMNS = ("age_band", "sex", "site")

COLUMNS = {
    "prediction_id": "TEXT PRIMARY KEY",
    "time": "TEXT",
    "model_name": "TEXT",
    "model_version": "TEXT",
    "input_sha256": "TEXT",
    "predicted_label": "TEXT",
    "confidence": "REAL",
    "tumour_probability": "REAL",
    "probabilities": "TEXT",
    "needs_review": "INTEGER",
    "latency_ms": "REAL",
    "request_id": "TEXT",
    "client": "TEXT",  # the calling API key's id (a system, not a person)
    "input_kind": "TEXT",
    "decisive_slice": "INTEGER",
    "operating_threshold": "REAL",
    **{name: "REAL" for name in STAT_COLUMNS},
    **{name: "REAL" for name in EMBEDDING_COLUMNS},
    "qc_flags": "TEXT",
    **{name: "TEXT" for name in SUBGROUP_COLUMNS},
    "feedback_label": "TEXT",
    "feedback_time": "TEXT",
}


class PredictionLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({', '.join(f'{k} {v}' for k, v in COLUMNS.items())})")
            present = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
            for name, kind in COLUMNS.items():  # logs written by an older version gain the new columns
                if name not in present:
                    db.execute(f"ALTER TABLE predictions ADD COLUMN {name} {kind}")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def append(self, record: dict) -> None:
        row = {name: record.get(name) for name in COLUMNS}
        row["probabilities"] = json.dumps(record.get("probabilities", {}))
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT INTO predictions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def add_feedback(self, prediction_id: str, label: str, time: str) -> bool:
        """Store a clinician's label for one prediction; False when no such prediction exists."""
        with closing(self._connect()) as db, db:
            cursor = db.execute(
                "UPDATE predictions SET feedback_label = ?, feedback_time = ? WHERE prediction_id = ?", (label, time, prediction_id)
            )
            return cursor.rowcount == 1

    def export_parquet(self, path: Path) -> Path:
        with closing(self._connect()) as db:
            pd.read_sql_query("SELECT * FROM predictions ORDER BY time", db).to_parquet(path, index=False)
        return path

    def labelled(self) -> pd.DataFrame:
        """Every prediction a clinician has labelled, oldest first."""
        with closing(self._connect()) as db:
            return pd.read_sql_query("SELECT * FROM predictions WHERE feedback_label IS NOT NULL ORDER BY time", db)

    def recent(self, limit: int, model_version: str | None = None) -> pd.DataFrame:
        """The newest ``limit`` records (of one model version, if given), oldest first."""
        where, args = ("WHERE model_version = ?", (model_version,)) if model_version else ("", ())
        with closing(self._connect()) as db:
            frame = pd.read_sql_query(f"SELECT * FROM predictions {where} ORDER BY time DESC LIMIT ?", db, params=(*args, limit))
        return frame.iloc[::-1].reset_index(drop=True)
