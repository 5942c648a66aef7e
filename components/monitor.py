"""Monitor: recent served predictions against the training reference, and whether to retrain.

Compares raw-image statistics and model outputs of the last ``window``
predictions with the held-out reference written by the evaluate stage, saves an
Evidently HTML + JSON report, and writes a decision file (with its reasons,
triggered or not) that the monitoring flow acts on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from components.config import MonitorConfig, load_params
from components.errors import DataError
from components.predictions import PredictionLog
from components.settings import get_settings

NUMERICAL = ["mean", "std", "p01", "p50", "p99", "foreground", "confidence", "tumour_probability"]
CATEGORICAL = ["predicted_label"]
DECISION_FILE = "decision.json"


@dataclass
class MonitorDecision:
    retrain: bool
    reasons: list[str]
    samples: int
    drifted_share: float = 0.0
    drifted_columns: list[str] = field(default_factory=list)
    report_html: str = ""
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def decide(config: MonitorConfig, reference: pd.DataFrame, current: pd.DataFrame) -> MonitorDecision:
    from components.drift import DriftDetector

    if len(current) < config.min_samples:
        return MonitorDecision(False, [f"only {len(current)} predictions; at least {config.min_samples} needed"], len(current))
    result = DriftDetector(NUMERICAL, CATEGORICAL, config.drift_share).fit(reference).score(current)
    drifted = result.drifted_share >= config.drift_share
    verdict = "at or above" if drifted else "below"
    reasons = [f"drifted column share {result.drifted_share:.2f} is {verdict} the threshold {config.drift_share}"]
    if result.drifted_columns:
        reasons.append("drifted: " + ", ".join(result.drifted_columns))
    config.report_dir.mkdir(parents=True, exist_ok=True)
    html = config.report_dir / "drift.html"
    result.save(html, config.report_dir / "drift.json")
    return MonitorDecision(drifted, reasons, len(current), result.drifted_share, result.drifted_columns, str(html))


def run(config: MonitorConfig, prediction_log: Path | None = None) -> MonitorDecision:
    if not config.reference.exists():
        raise DataError(config.reference, "no reference statistics: run the training pipeline first")
    log_path = prediction_log or get_settings().prediction_log_path
    if not log_path.exists():
        raise DataError(log_path, "no prediction log: nothing has been served yet")
    current = PredictionLog(log_path).recent(config.window)
    decision = decide(config, pd.read_csv(config.reference), current)
    config.report_dir.mkdir(parents=True, exist_ok=True)
    (config.report_dir / DECISION_FILE).write_text(json.dumps(asdict(decision), indent=2))
    with (config.report_dir / "decisions.jsonl").open("a") as history:
        history.write(json.dumps(asdict(decision)) + "\n")
    print(
        f"monitoring: {'RETRAIN' if decision.retrain else 'no retraining'} ({decision.samples} predictions): " + "; ".join(decision.reasons)
    )
    return decision


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().monitor))


if __name__ == "__main__":
    main()
