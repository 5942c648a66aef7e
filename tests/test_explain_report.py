"""The evaluation's explanation report on a tiny cohort: heatmaps scored against masks, the embedding map,
training curves from a real MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def test_report_scores_heatmaps_against_masks_and_draws_its_figures(tiny_cohort: Path, tmp_path: Path, monkeypatch):
    import mlflow
    import torch

    from components.explain_report import write
    from components.model import Classifier, ModelSpec, build_network
    from components.settings import get_settings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", uri)
    get_settings.cache_clear()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:  # explicit: earlier tests leave another experiment active
        for epoch, loss in enumerate([0.9, 0.6, 0.4]):
            mlflow.log_metrics({"train_loss": loss, "val_loss": loss + 0.1, "val_auc": 1 - loss / 2}, step=epoch)
    meta = pd.read_csv(tiny_cohort / "metadata.csv")
    test = pd.DataFrame(
        {
            "image_id": [f"im{i}" for i in range(len(meta))],
            "path": [str(tiny_cohort / f) for f in meta["file"]],
            "mask_path": [str(tiny_cohort / m) if isinstance(m, str) else None for m in meta["mask"]],
            "label": [f.split("/")[0] for f in meta["file"]],
        }
    )
    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=64, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    embedding = np.random.default_rng(0).normal(size=(len(test), 5))
    summary = write(Classifier(spec, build_network(spec)), test, embedding, run.info.run_id, tmp_path / "explanations", max_tumours=3)
    assert set(summary) == {"gradcam_mass", "occlusion_mass", "gradcam_hit", "occlusion_hit", "chance"}
    assert 0 < summary["chance"] < 0.5  # an untrained net may have no Grad-CAM mass at all (NaN); localisation: test_explain
    assert all(np.isnan(summary[k]) or 0 <= summary[k] <= 1 for k in ("gradcam_mass", "occlusion_mass", "gradcam_hit", "occlusion_hit"))
    written = {p.name for p in (tmp_path / "explanations").iterdir()}
    assert {"training_curves.png", "embedding_tsne.png", "example_0_gradcam.png", "summary.json"} <= written
    assert json.loads((tmp_path / "explanations" / "summary.json").read_text()).keys() == summary.keys()
    get_settings.cache_clear()
