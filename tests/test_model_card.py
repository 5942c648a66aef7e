"""The model card from a real MLflow run: metrics, calibration, subgroups, and its markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def test_card_comes_from_the_run_and_renders(tmp_path: Path, monkeypatch):
    import mlflow

    from components.model_card import build_card, publish, render_markdown
    from components.settings import get_settings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", uri)
    get_settings.cache_clear()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("cards", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_params({"data_hash": "abc123", "classes": "notumor,tumor", "epochs": 3})
        mlflow.log_metrics(
            {"test_accuracy": 0.91, "test_sensitivity": 0.95, "operating_threshold": 0.31, "val_specificity_at_threshold": 0.9}
        )
        table = tmp_path / "subgroups.csv"
        pd.DataFrame({"attribute": ["sex", "sex"], "group": ["F", "M"], "sensitivity": [0.93, 0.97], "images": [40, 44]}).to_csv(
            table, index=False
        )
        mlflow.log_artifact(str(table), artifact_path="evaluation")
        mlflow.set_tags({"tumorscope.trained_run": "train-run-1", "tumorscope.pretrained_run": "pretrain-run-1"})
    card = build_card("tumorscope-x", "4", mlflow.get_run(run.info.run_id))
    assert card["metrics"] == {"accuracy": 0.91, "sensitivity": 0.95}
    assert card["calibration"] == {"operating_threshold": 0.31, "val_specificity_at_threshold": 0.9}, "what the threshold costs"
    assert card["data"]["classes"] == ["notumor", "tumor"]
    assert [row["group"] for row in card["subgroups"]] == ["F", "M"] and card["training"] == {"epochs": "3"}
    markdown = render_markdown(card)
    assert f"calibration `{run.info.run_id}`, training `train-run-1`, pretraining `pretrain-run-1`" in markdown
    assert "| sensitivity | 0.9500 |" in markdown and "| sex | F | 0.930 | 40 |" in markdown and "## Not for" in markdown
    (tmp_path / "bento").mkdir()
    publish(card, tmp_path / "bento")
    assert json.loads((tmp_path / "bento" / "model_card.json").read_text())["model_version"] == "4"
    assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/tumorscope/model_card.json")["model_name"] == "tumorscope-x"
    get_settings.cache_clear()
