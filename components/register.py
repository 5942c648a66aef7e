"""Register: the gate between a calibrated model and the ``champion`` alias.

Every candidate becomes a registered version (alias ``challenger``, tag
``gate=passed|refused``). The ``champion`` alias moves to it only if it meets
every threshold in params.yaml *and* is not worse than the current champion
re-scored on the same test images (a paired bootstrap, so that two equally good
models are not told apart by a couple of flipped images). Each decision, with its reasons, is written to
``reports/gate.json`` and appended to a promotion log, since MLflow keeps no
history of alias moves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from components.comparison import RESAMPLES, Difference, paired_differences
from components.config import RegisterConfig, load_params
from components.errors import DataError, TumorScopeError
from components.registry import CHALLENGER, CHAMPION, client, load_version, version_by_alias
from components.settings import get_settings

METRICS_FILE, GATE_FILE = Path("reports/metrics.json"), Path("reports/gate.json")
PREDICTIONS_FILE = Path("reports/test_predictions.csv")


@dataclass
class GateDecision:
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    candidate_version: str = ""
    champion_version: str = ""
    champion_metrics: dict[str, float] = field(default_factory=dict)


def threshold_failures(metrics: dict[str, float], config: RegisterConfig) -> list[str]:
    """Which absolute thresholds the candidate misses (NaN counts as a miss)."""
    required = {
        "accuracy": config.min_accuracy,
        "sensitivity": config.min_sensitivity,
        "specificity": config.min_specificity,
        "roc_auc": config.min_auc,
    }
    if "worst_subgroup_sensitivity" in metrics:  # only where the data has subgroups big enough to judge
        required["worst_subgroup_sensitivity"] = config.min_subgroup_sensitivity
    failures = [
        f"{name} {metrics.get(name, float('nan')):.4f} is below the required {minimum}"
        for name, minimum in required.items()
        if not metrics.get(name, float("nan")) >= minimum
    ]
    smallest = metrics.get("smallest_lesion_mm", float("nan"))
    if config.max_smallest_lesion_mm is not None and not smallest <= config.max_smallest_lesion_mm:
        failures.append(
            f"smallest lesion found in 90% of slices is {smallest:.1f} mm; at most {config.max_smallest_lesion_mm} mm is required"
        )
    return failures


def comparison_failures(differences: list[Difference], tolerance: float) -> list[str]:
    """Where the candidate is worse than the champion on the same images: beyond the tolerance in 95 % of the
    paired resamples (components/comparison.py), not merely on this one draw of test images."""
    return [
        f"{d.metric} {d.challenger:.4f} is worse than the champion's {d.champion:.4f} on the same test images "
        f"(the difference stays below {d.upper_bound:+.4f} in 95 % of {RESAMPLES} paired resamples; tolerance {tolerance})"
        for d in differences
        if d.worse(tolerance)
    ]


def decide(metrics: dict[str, float], config: RegisterConfig, differences: list[Difference] | None) -> GateDecision:
    reasons = threshold_failures(metrics, config)
    if differences is not None:
        reasons += comparison_failures(differences, config.tolerance)
    return GateDecision(promoted=not reasons, reasons=reasons or ["meets every threshold and is not worse than the champion"])


def rescore_champion(version, test: pd.DataFrame, min_group_size: int) -> tuple[dict[str, float], pd.DataFrame]:
    """The champion's metrics and per-image predictions on *this* test split, so the comparison is like for like."""
    from components.evaluate import assess, test_predictions

    champion = load_version(version)
    if sorted(champion.spec.classes) != sorted(test["label"].unique()):
        raise TumorScopeError(
            f"the champion (version {version.version}) predicts {champion.spec.classes}, this data has {sorted(test['label'].unique())}: "
            "set register.model_name to a new name for a different task"
        )
    metrics, probabilities, _, _ = assess(champion, test, min_group_size)
    return metrics, test_predictions(champion.spec, test, probabilities)


def _rescore_or_explain(champion, test: pd.DataFrame, min_group_size: int) -> tuple[tuple | None, str]:
    """The champion's metrics and predictions, or why they could not be had (then the gate refuses: no blind replacement)."""
    if champion is None:
        return None, ""
    try:
        return rescore_champion(champion, test, min_group_size), ""
    except TumorScopeError:
        raise
    except Exception as exc:  # a champion that cannot be loaded or run is a finding, not a crash
        return (
            None,
            f"the champion (version {champion.version}) could not be re-scored on this test split ({exc.__class__.__name__}; details withheld: they can hold file paths)",
        )


def run(
    config: RegisterConfig, split_file: Path = Path("data/split.csv"), min_group_size: int = 20, model_dir: Path = Path("models_calibrated")
) -> GateDecision:
    import mlflow

    registry = client()
    metrics = json.loads(METRICS_FILE.read_text())
    calibrated = json.loads((model_dir / "model.json").read_text())
    if "mlflow_model_uri" not in calibrated:
        raise DataError(model_dir / "model.json", "not a calibrated model: evaluate.model_dir must be calibrate.out_dir")
    champion = version_by_alias(registry, config.model_name, CHAMPION)
    test = pd.read_csv(split_file).query("split == 'test'").reset_index(drop=True)
    rescored, unscored = _rescore_or_explain(champion, test, min_group_size)
    champion_metrics, differences = None, None
    if rescored is not None:
        champion_metrics, champion_predictions = rescored
        candidate_predictions = pd.read_csv(PREDICTIONS_FILE).set_index("image_id").loc[test["image_id"]].reset_index()
        differences = paired_differences(test, candidate_predictions, champion_predictions, min_group_size)
    decision = decide(metrics, config, differences)
    if unscored:
        decision.promoted = False
        decision.reasons = [unscored, *[r for r in decision.reasons if not r.startswith("meets every")]]
    candidate = mlflow.register_model(calibrated["mlflow_model_uri"], config.model_name)
    decision.candidate_version = str(candidate.version)
    registry.set_registered_model_alias(config.model_name, CHALLENGER, candidate.version)
    registry.set_model_version_tag(config.model_name, candidate.version, "gate", "passed" if decision.promoted else "refused")
    registry.set_model_version_tag(config.model_name, candidate.version, "data_hash", calibrated["data_hash"])
    registry.set_model_version_tag(config.model_name, candidate.version, "trained_run", calibrated.get("trained_run_id", ""))
    if champion:
        decision.champion_version, decision.champion_metrics = str(champion.version), champion_metrics
    if decision.promoted:
        registry.set_registered_model_alias(config.model_name, CHAMPION, candidate.version)
    _record(decision, config, calibrated)
    verdict = "promoted to champion" if decision.promoted else "refused; champion unchanged"
    print(f"gate: {config.model_name} version {candidate.version} {verdict}: " + "; ".join(decision.reasons))
    return decision


def _record(decision: GateDecision, config: RegisterConfig, calibrated: dict) -> None:
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": config.model_name,
        "run_id": calibrated["run_id"],
        "trained_run_id": calibrated.get("trained_run_id"),
        "data_hash": calibrated["data_hash"],
        **asdict(decision),
    }
    GATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    GATE_FILE.write_text(json.dumps(entry, indent=2))
    log = get_settings().state_dir / "promotions.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _promotions() -> list[dict]:
    log = get_settings().state_dir / "promotions.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def rollback(model_name: str) -> dict:
    """Move ``champion`` back to the version that held it before the current one, and log the move.

    The promotion log is the history (MLflow keeps none of alias moves); a rollback
    is itself logged, so a second rollback goes one step further back.
    """
    registry = client()
    current = version_by_alias(registry, model_name, CHAMPION)
    if current is None:
        raise TumorScopeError(f"registry: {model_name} has no '{CHAMPION}' to roll back")
    history = [entry for entry in _promotions() if entry.get("model_name") == model_name]
    holders = [str(e["candidate_version"]) for e in history if e.get("promoted")]
    rolled_back = {str(e["from_version"]) for e in history if e.get("action") == "rollback"}
    earlier = [v for v in holders if v != str(current.version) and v not in rolled_back]
    if not earlier:
        raise TumorScopeError(f"registry: no earlier champion of {model_name} to roll back to (promotion log: {len(holders)} promotions)")
    target = earlier[-1]
    registry.set_registered_model_alias(model_name, CHAMPION, target)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": model_name,
        "action": "rollback",
        "from_version": str(current.version),
        "to_version": target,
    }
    with (get_settings().state_dir / "promotions.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


def main() -> None:
    from components.stage import run_stage

    def work() -> GateDecision:
        params = load_params()
        evaluated = params.evaluate
        return run(params.register_, evaluated.split, evaluated.min_group_size, evaluated.model_dir)

    run_stage(work)


if __name__ == "__main__":
    main()
