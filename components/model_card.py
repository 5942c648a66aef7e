"""The model card of a registered version (Mitchell et al. 2019): what it is for, what it is not for, what
data made it, how well it does overall and per subgroup, how its confidences are calibrated, and its limits.

Built from the version's own MLflow run (params, test metrics, calibration, the subgroup table), so it
describes the version it ships with even when it was trained long ago. The package stage writes it as JSON
and markdown into the bento (the endpoint's ``GET /model`` serves it) and logs both to the run.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

INTENDED_USE = (
    "A second reader for brain MRI: it flags slices or volumes likely to show a tumour (and the tumour type where it "
    "was trained on types) so that a radiologist or neurologist looks at them first. Every answer is for a clinician "
    "to confirm or correct."
)
NOT_FOR = [
    "a diagnosis or a treatment decision without a clinician's reading",
    "children, CT, or images other than brain MRI (such inputs are flagged for review, not reliably refused)",
    "lesion size, grade or outline: the heatmap shows what drove the score, it is not a segmentation",
]
LIMITATIONS = [
    "trained on the data named below (and, where the training parameters name init_weights, started from those weights); "
    "public research sets and the synthetic cohort are not a hospital's case mix",
    "test figures come from one leak-free held-out split (subjects and near-duplicates kept together), not from external validation",
    "subgroups smaller than the evaluation's minimum group size are reported but not judged",
    "small lesions are the hardest: see the lesion-size curve where the evaluation produced one",
]
CALIBRATION_METRICS = (
    "calibration_temperature",
    "operating_threshold",
    "threshold_for_target_sensitivity",
    "val_sensitivity_at_threshold",
    "val_specificity_at_threshold",
    "val_ece_uncalibrated",
    "val_ece_calibrated",
)
TEST_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "worst_subgroup_sensitivity", "images")


def build_card(model_name: str, version: str, run) -> dict:
    """The card of one registered version from its MLflow run."""
    metrics, params = run.data.metrics, run.data.params
    return {
        "model_name": model_name,
        "model_version": str(version),
        "run_id": run.info.run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "limitations": LIMITATIONS,
        "data": {"data_hash": params.get("data_hash"), "classes": params.get("classes", "").split(",")},
        "trained_run_id": run.data.tags.get("tumorscope.trained_run"),  # the calibration's run names its training run
        "pretrained_run_id": run.data.tags.get("tumorscope.pretrained_run"),  # and the pretraining its weights started from
        "training": {k: params[k] for k in sorted(params) if k not in ("data_hash", "classes")},
        "metrics": {name: metrics[f"test_{name}"] for name in TEST_METRICS if f"test_{name}" in metrics},
        "calibration": {name: metrics[name] for name in CALIBRATION_METRICS if name in metrics},
        "subgroups": _subgroups(run.info.run_id),
        "explanations": _explanations(float(params.get("mask_weight") or 0) > 0),
    }


def _explanations(has_lesion_map: bool) -> str:
    lesion_map = "; method=lesion-map: the quarter-resolution lesion map this model learnt from masks" if has_lesion_map else ""
    return (
        f"POST /explain returns an occlusion heatmap per answer (method=grad-cam: Grad-CAM{lesion_map}); "
        "read it as evidence, not as a lesion outline."
    )


def _subgroups(run_id: str) -> list[dict]:
    """The evaluation's per-subgroup table, as logged to the run (empty when it was not)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/subgroups.csv")
    except (MlflowException, OSError):
        return []
    table = pd.read_csv(io.StringIO(text))
    return json.loads(table.to_json(orient="records"))


def render_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['model_name']} version {card['model_version']}", "", "## Intended use", card["intended_use"], ""]
    lines += ["## Not for", *[f"- {item}" for item in card["not_for"]], "", "## Data"]
    lines += [f"- classes: {', '.join(card['data']['classes'])}", f"- data version (split hash): `{card['data']['data_hash']}`"]
    training = f", training `{card['trained_run_id']}`" if card.get("trained_run_id") else ""  # versions before the calibrate stage
    pretraining = f", pretraining `{card['pretrained_run_id']}`" if card.get("pretrained_run_id") else ""
    lines += [f"- MLflow runs: calibration `{card['run_id']}`{training}{pretraining}", ""]
    lines += ["## Test metrics", "| metric | value |", "|---|---|", *[f"| {k} | {v:.4f} |" for k, v in card["metrics"].items()], ""]
    lines += ["## Calibration and operating point", *[f"- {k}: {v:.4f}" for k, v in card["calibration"].items()], ""]
    if card["subgroups"]:
        columns = list(card["subgroups"][0])
        lines += ["## Subgroups", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in card["subgroups"]]
        lines.append("")
    lines += ["## Limitations", *[f"- {item}" for item in card["limitations"]], "", "## Explanations", card["explanations"], ""]
    lines += ["## Training parameters", *[f"- {k}: {v}" for k, v in card["training"].items()], ""]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def publish(card: dict, folder: Path) -> None:
    """Write the card into ``folder`` (the bento model) and log it to its run."""
    import mlflow

    from components.settings import get_settings

    markdown = render_markdown(card)
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    (folder / "model_card.md").write_text(markdown)
    client = mlflow.MlflowClient(get_settings().tracking_uri)
    client.log_dict(card["run_id"], card, "tumorscope/model_card.json")
    client.log_text(card["run_id"], markdown, "tumorscope/model_card.md")
