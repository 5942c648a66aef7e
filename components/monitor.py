"""Monitor: recent served predictions against the training reference, and whether to retrain.

Compares raw-image statistics and model outputs of the last ``window``
predictions with the held-out reference written by the evaluate stage, saves an
Evidently HTML + JSON report, and writes a decision file (with its reasons,
triggered or not) that the monitoring flow acts on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from components.config import NO_TUMOUR, MonitorConfig, load_params
from components.errors import DataError
from components.predictions import PredictionLog
from components.settings import get_settings

IMAGE_COLUMNS = ["mean", "std", "p01", "p50", "p99", "foreground"]
OUTPUT_COLUMNS = ["confidence", "tumour_probability"]
NUMERICAL = IMAGE_COLUMNS + OUTPUT_COLUMNS
CATEGORICAL = ["predicted_label"]
METADATA_COLUMNS = ["site", "sex", "age_band"]
DECISION_FILE, HISTORY_FILE = "decision.json", "decisions.jsonl"
METRICS_FILE = Path("reports/metrics.json")
COOLDOWN_OVERRIDE = "TUMORSCOPE_MONITOR_COOLDOWN_HOURS"
WORKSPACE, DRIFT_PROJECT, QUALITY_PROJECT = "evidently-workspace", "tumorscope-monitoring", "tumorscope-quality"
GATE_REACHED, FAILED, WORKSPACE_BUSY = "reached the gate", "failed", "workspace busy"  # a retraining's outcomes
RAN = (GATE_REACHED, FAILED)  # outcomes that start the cooldown


@dataclass
class MonitorDecision:
    retrain: bool
    reasons: list[str]
    samples: int
    drifted_share: float = 0.0
    drifted_columns: list[str] = field(default_factory=list)
    report_html: str = ""
    model_version: str | None = None  # the champion whose predictions and reference were compared
    embedding_drifted_share: float | None = None
    feedback_quality: dict = field(default_factory=dict)
    subgroup_sensitivity_gap: float | None = None
    reports: list[str] = field(default_factory=list)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def feedback_quality(current: pd.DataFrame, baseline_accuracy: float | None, config: MonitorConfig) -> tuple[bool, str | None]:
    """Accuracy on clinician-labelled predictions against the test accuracy at training time."""
    labelled = _labelled(current)
    if len(labelled) < config.min_feedback or baseline_accuracy is None:
        return False, f"{len(labelled)} feedback labels; quality is judged from {config.min_feedback}" if len(labelled) else None
    accuracy = float((labelled["feedback_label"] == labelled["predicted_label"]).mean())
    dropped = baseline_accuracy - accuracy > config.max_accuracy_drop
    verdict = "dropped by more than" if dropped else "within"
    return (
        dropped,
        f"accuracy on {len(labelled)} feedback labels {accuracy:.3f} vs {baseline_accuracy:.3f} at training: {verdict} {config.max_accuracy_drop}",
    )


def _labelled(current: pd.DataFrame) -> pd.DataFrame:
    return current.dropna(subset=["feedback_label"]) if "feedback_label" in current else current.iloc[:0]


def subgroup_gap(labelled: pd.DataFrame, config: MonitorConfig) -> tuple[float | None, pd.DataFrame]:
    """The largest difference in sensitivity between subgroups (sex, age band, site) on feedback labels,
    over groups with at least ``min_subgroup_feedback`` tumour cases."""
    from components.fairness import subgroup_table

    if labelled.empty:
        return None, pd.DataFrame()
    table = subgroup_table(
        labelled, labelled["feedback_label"].ne(NO_TUMOUR).to_numpy(), labelled["predicted_label"].ne(NO_TUMOUR).to_numpy()
    )
    judged = table[(table["positives"] >= config.min_subgroup_feedback) & table["sensitivity"].notna()] if len(table) else table
    gaps = [float(rows["sensitivity"].max() - rows["sensitivity"].min()) for _, rows in judged.groupby("subgroup") if len(rows) > 1]
    return (max(gaps) if gaps else None), table


def in_cooldown(history: list[dict], config: MonitorConfig, now: datetime) -> str | None:
    """Why retraining must wait: a retraining ran to an end (the gate, or a failed stage) less than the cooldown
    ago. A decision alone does not count, nor a retraining refused by a busy workspace: the drift is still
    unanswered, so the next check must be free to decide again. A failure does count, so that a stage that fails
    every time is not rerun every hour; its flow run says why."""
    ended = _ended(history)
    if ended and now - max(ended) < timedelta(hours=config.cooldown_hours):
        return f"cooldown: the last retraining ended at {max(ended).isoformat()} (cooldown {config.cooldown_hours} h)"
    return None


def retraining_since(report_dir: Path, decided: str) -> str | None:
    """When a retraining ended after the decision taken at ``decided``: a check queued behind a running retraining
    has then had its answer (both saw the same drift)."""
    later = [time for time in _ended(_history(report_dir)) if time >= datetime.fromisoformat(decided)]
    return max(later).isoformat() if later else None


def _ended(history: list[dict]) -> list[datetime]:
    """When the retrainings in the history ended (at the gate or in a failed stage)."""
    return [datetime.fromisoformat(entry["time"]) for entry in history if entry.get("retraining") in RAN]


def record_retraining(report_dir: Path, outcome: str, gate: dict | None = None) -> None:
    """Append a retraining's outcome (GATE_REACHED, FAILED or WORKSPACE_BUSY) to the decision history, with the
    gate's versions and verdict. A failure's message can name a file, so it stays in the flow run's log."""
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "retraining": outcome}
    if gate is not None:
        entry |= {"candidate_version": gate.get("candidate_version"), "promoted": bool(gate.get("promoted"))}
    _append_history(report_dir, entry)


def _append_history(report_dir: Path, entry: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    with (report_dir / HISTORY_FILE).open("a") as history:
        history.write(json.dumps(entry) + "\n")


def _present(columns: list[str], reference: pd.DataFrame, current: pd.DataFrame, min_known: float = 0.8) -> list[str]:
    """Columns both tables hold with mostly known values (older models and callers leave some empty)."""
    return [
        c
        for c in columns
        if c in reference and c in current and reference[c].notna().mean() >= min_known and current[c].notna().mean() >= min_known
    ]


def decide(
    config: MonitorConfig,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    baseline_accuracy: float | None = None,
    history: list[dict] | None = None,
    now: datetime | None = None,
) -> MonitorDecision:
    """Data drift, embedding drift, feedback quality and subgroup gap, each a reason (triggered or not);
    retrain when any triggers and no cooldown holds. Every report is saved and added to the workspace."""
    from components.drift import DriftDetector, add_snapshot
    from components.model import EMBEDDING_COLUMNS

    if len(current) < config.min_samples:
        return MonitorDecision(False, [f"only {len(current)} predictions; at least {config.min_samples} needed"], len(current))
    config.report_dir.mkdir(parents=True, exist_ok=True)
    workspace = config.report_dir / WORKSPACE
    categorical = CATEGORICAL + _present(METADATA_COLUMNS, reference, current)
    data = DriftDetector(_present(NUMERICAL, reference, current), categorical, config.drift_share).fit(reference).score(current)
    data.save(config.report_dir / "drift.html", config.report_dir / "drift.json")
    add_snapshot(workspace, DRIFT_PROJECT, data.snapshot)
    drifted = data.drifted_share >= config.drift_share
    reasons = [
        f"drifted column share {data.drifted_share:.2f} is {'at or above' if drifted else 'below'} the threshold {config.drift_share}"
    ]
    reasons += ["drifted: " + ", ".join(data.drifted_columns)] if data.drifted_columns else []
    decision = MonitorDecision(
        False, reasons, len(current), data.drifted_share, data.drifted_columns, str(config.report_dir / "drift.html")
    )
    decision.reports.append(decision.report_html)
    triggers = [drifted]
    embedding = _present(EMBEDDING_COLUMNS, reference, current)
    if embedding:
        moved = DriftDetector(embedding, [], config.embedding_drift_share).fit(reference).score(current)
        moved.save(config.report_dir / "embedding-drift.html", config.report_dir / "embedding-drift.json")
        add_snapshot(workspace, DRIFT_PROJECT, moved.snapshot)
        decision.embedding_drifted_share = moved.drifted_share
        triggers.append(moved.drifted_share >= config.embedding_drift_share)
        verdict = "at or above" if triggers[-1] else "below"
        decision.reasons.append(
            f"embedding drift share {moved.drifted_share:.2f} is {verdict} the threshold {config.embedding_drift_share}"
        )
        decision.reports.append(str(config.report_dir / "embedding-drift.html"))
    quality_dropped, quality_reason = feedback_quality(current, baseline_accuracy, config)
    triggers.append(quality_dropped)
    decision.reasons += [quality_reason] if quality_reason else []
    triggers.append(_judge_feedback(_labelled(current), config, decision, workspace))
    decision.retrain = any(triggers)
    waiting = in_cooldown(history or [], config, now or datetime.now(UTC)) if decision.retrain else None
    if waiting:
        decision.retrain = False
        decision.reasons.append(waiting)
    return decision


def _judge_feedback(labelled: pd.DataFrame, config: MonitorConfig, decision: MonitorDecision, workspace: Path) -> bool:
    """Evidently quality reports on feedback labels (overall and per subgroup) and the subgroup-gap trigger."""
    from components.drift import add_snapshot
    from components.fairness import with_age_band
    from components.quality import classification_quality

    if len(labelled) < config.min_feedback:
        return False
    quality = classification_quality(labelled)
    quality.save(config.report_dir / "quality.html", config.report_dir / "quality.json")
    add_snapshot(workspace, QUALITY_PROJECT, quality.snapshot)
    decision.feedback_quality = quality.metrics
    decision.reports.append(str(config.report_dir / "quality.html"))
    banded = with_age_band(labelled)
    for column in (c for c in METADATA_COLUMNS if c in banded):
        for value, rows in banded.groupby(column):
            if len(rows) >= config.min_subgroup_feedback:
                name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{column}-{value}")
                classification_quality(rows).save(config.report_dir / f"quality-{name}.html", config.report_dir / f"quality-{name}.json")
                decision.reports.append(str(config.report_dir / f"quality-{name}.html"))
    gap, table = subgroup_gap(labelled, config)
    if len(table):
        table.to_csv(config.report_dir / "subgroups.csv", index=False)
    decision.subgroup_sensitivity_gap = gap
    if gap is None:
        return False
    widened = gap > config.max_subgroup_gap
    decision.reasons.append(
        f"subgroup sensitivity gap on feedback {gap:.2f} is {'above' if widened else 'within'} {config.max_subgroup_gap}"
    )
    return widened


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
    _append_history(config.report_dir, asdict(decision))
    print(
        f"monitoring: {'RETRAIN' if decision.retrain else 'no retraining'} ({decision.samples} predictions): " + "; ".join(decision.reasons)
    )
    return decision


def main() -> None:
    from components.stage import run_stage

    def work() -> MonitorDecision:
        params = load_params()
        config = params.monitor
        override = os.environ.get(COOLDOWN_OVERRIDE)
        if override is not None:  # `tumorscope monitor --cooldown-hours`, e.g. the demo's second check
            config = config.model_copy(update={"cooldown_hours": float(override)})
        return run(config, model_name=params.register_.model_name)

    run_stage(work)


if __name__ == "__main__":
    main()
