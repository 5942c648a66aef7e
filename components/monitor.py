"""Monitor: recent served predictions against the training reference, and whether to retrain.

Compares raw-image statistics and model outputs of the last ``window``
predictions with the held-out reference written by the evaluate stage, saves an
Evidently HTML + JSON report, and writes a decision file (with its reasons,
triggered or not) that the monitoring flow acts on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from components.config import MonitorConfig, load_params
from components.errors import DataError
from components.predictions import PredictionLog
from components.settings import get_settings

NUMERICAL = ["mean", "std", "p01", "p50", "p99", "foreground", "confidence", "tumour_probability"]
CATEGORICAL = ["predicted_label"]
DECISION_FILE, HISTORY_FILE = "decision.json", "decisions.jsonl"
METRICS_FILE = Path("reports/metrics.json")


@dataclass
class MonitorDecision:
    retrain: bool
    reasons: list[str]
    samples: int
    drifted_share: float = 0.0
    drifted_columns: list[str] = field(default_factory=list)
    report_html: str = ""
    model_version: str | None = None  # the champion whose predictions and reference were compared
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def feedback_quality(current: pd.DataFrame, baseline_accuracy: float | None, config: MonitorConfig) -> tuple[bool, str | None]:
    """Accuracy on clinician-labelled predictions against the test accuracy at training time."""
    labelled = current.dropna(subset=["feedback_label"]) if "feedback_label" in current else current.iloc[:0]
    if len(labelled) < config.min_feedback or baseline_accuracy is None:
        return False, f"{len(labelled)} feedback labels; quality is judged from {config.min_feedback}" if len(labelled) else None
    accuracy = float((labelled["feedback_label"] == labelled["predicted_label"]).mean())
    dropped = baseline_accuracy - accuracy > config.max_accuracy_drop
    verdict = "dropped by more than" if dropped else "within"
    return (
        dropped,
        f"accuracy on {len(labelled)} feedback labels {accuracy:.3f} vs {baseline_accuracy:.3f} at training: {verdict} {config.max_accuracy_drop}",
    )


def in_cooldown(history: list[dict], config: MonitorConfig, now: datetime) -> str | None:
    """Why retraining must wait, if a retraining decision was taken less than the cooldown ago."""
    triggered = [datetime.fromisoformat(entry["time"]) for entry in history if entry.get("retrain")]
    if triggered and now - max(triggered) < timedelta(hours=config.cooldown_hours):
        return f"cooldown: the last retraining decision was at {max(triggered).isoformat()} (cooldown {config.cooldown_hours} h)"
    return None


def decide(
    config: MonitorConfig,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    baseline_accuracy: float | None = None,
    history: list[dict] | None = None,
    now: datetime | None = None,
) -> MonitorDecision:
    """Drift and feedback quality, each a reason; retrain when either says so and no cooldown holds."""
    from components.drift import DriftDetector

    if len(current) < config.min_samples:
        return MonitorDecision(False, [f"only {len(current)} predictions; at least {config.min_samples} needed"], len(current))
    result = DriftDetector(NUMERICAL, CATEGORICAL, config.drift_share).fit(reference).score(current)
    drifted = result.drifted_share >= config.drift_share
    verdict = "at or above" if drifted else "below"
    reasons = [f"drifted column share {result.drifted_share:.2f} is {verdict} the threshold {config.drift_share}"]
    if result.drifted_columns:
        reasons.append("drifted: " + ", ".join(result.drifted_columns))
    quality_dropped, quality_reason = feedback_quality(current, baseline_accuracy, config)
    reasons += [quality_reason] if quality_reason else []
    retrain = drifted or quality_dropped
    waiting = in_cooldown(history or [], config, now or datetime.now(UTC)) if retrain else None
    if waiting:
        retrain, reasons = False, [*reasons, waiting]
    config.report_dir.mkdir(parents=True, exist_ok=True)
    html = config.report_dir / "drift.html"
    result.save(html, config.report_dir / "drift.json")
    result.add_to_workspace(config.report_dir / "evidently-workspace", "tumorscope-monitoring")
    return MonitorDecision(retrain, reasons, len(current), result.drifted_share, result.drifted_columns, str(html))


def _history(report_dir: Path) -> list[dict]:
    path = report_dir / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _baseline_accuracy() -> float | None:
    return json.loads(METRICS_FILE.read_text()).get("accuracy") if METRICS_FILE.exists() else None


def champion_baseline(model_name: str) -> tuple[str, pd.DataFrame, float | None] | None:
    """The serving champion's version, its own held-out reference and test accuracy, from MLflow.

    A candidate the gate refused also rewrites data/reference.csv; the champion's copy in its
    MLflow run is what the served predictions must be compared with.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.registry import CHAMPION, client, version_by_alias

    registry = client()
    champion = version_by_alias(registry, model_name, CHAMPION)
    if champion is None:
        return None
    try:
        reference = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{champion.run_id}/evaluation/reference.csv"))
    except (MlflowException, OSError):
        return None
    accuracy = registry.get_run(champion.run_id).data.metrics.get("test_accuracy")
    return str(champion.version), reference, accuracy


def run(config: MonitorConfig, prediction_log: Path | None = None, model_name: str | None = None) -> MonitorDecision:
    log_path = prediction_log or get_settings().prediction_log_path
    if not log_path.exists():
        raise DataError(log_path, "no prediction log: nothing has been served yet")
    baseline = champion_baseline(model_name) if model_name else None
    if baseline is not None:
        version, reference, accuracy = baseline
        current = PredictionLog(log_path).recent(config.window, model_version=version)
    elif config.reference.exists():
        version, reference, accuracy = None, pd.read_csv(config.reference), _baseline_accuracy()
        current = PredictionLog(log_path).recent(config.window)
    else:
        raise DataError(config.reference, "no reference statistics: run the training pipeline first")
    decision = decide(config, reference, current, accuracy, _history(config.report_dir))
    decision.model_version = version
    config.report_dir.mkdir(parents=True, exist_ok=True)
    (config.report_dir / DECISION_FILE).write_text(json.dumps(asdict(decision), indent=2))
    with (config.report_dir / HISTORY_FILE).open("a") as history:
        history.write(json.dumps(asdict(decision)) + "\n")
    print(
        f"monitoring: {'RETRAIN' if decision.retrain else 'no retraining'} ({decision.samples} predictions): " + "; ".join(decision.reasons)
    )
    return decision


def main() -> None:
    from components.stage import run_stage

    def work() -> MonitorDecision:
        params = load_params()
        return run(params.monitor, model_name=params.register_.model_name)

    run_stage(work)


if __name__ == "__main__":
    main()
