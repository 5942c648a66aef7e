"""Classical baselines on a radiomics table: every model scored with intervals, the fusion where clinical
columns exist, and permutation importance that finds the informative feature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import ClassicalConfig
from components.errors import DataError


def _tables(folder: Path, with_clinical: bool) -> ClassicalConfig:
    rng = np.random.default_rng(0)
    n = 400
    label = np.where(np.arange(n) % 2 == 0, "tumor", "notumor")
    informative = (label == "tumor") * 2.5 + rng.normal(0, 1, n)
    features = pd.DataFrame({"image_id": [f"im{i}" for i in range(n)], "subject": [f"s{i}" for i in range(n)], "label": label,
                             "split": np.tile(["train", "train", "train", "val", "test"], n // 5 + 1)[:n],
                             "signal": informative, "noise_a": rng.normal(size=n), "noise_b": rng.normal(size=n)})  # fmt: skip
    features.to_csv(folder / "features.csv", index=False)
    split = features[["image_id", "label", "split"]].copy()
    if with_clinical:
        split["age"] = np.where(rng.random(n) < 0.1, np.nan, rng.integers(20, 80, n))
        split["sex"] = rng.choice(["F", "M"], n)
    split.to_csv(folder / "split.csv", index=False)
    (folder / "selected.json").write_text(json.dumps({"features": ["signal", "noise_a", "noise_b"]}))
    return ClassicalConfig(features=folder / "features.csv", selected=folder / "selected.json", split=folder / "split.csv",
                           report_dir=folder / "reports", bootstrap_resamples=50)  # fmt: skip


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    from components.settings import get_settings

    monkeypatch.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_every_model_is_scored_with_intervals_and_the_fusion_runs_where_clinical_columns_exist(tmp_path: Path):
    from components.classical import run

    metrics = run(_tables(tmp_path, with_clinical=True))
    auc = metrics[metrics["metric"] == "roc_auc"]
    assert set(auc["model"]) == {"logistic_regression", "svm", "random_forest", "gradient_boosting"}
    assert set(auc["variant"]) == {"radiomics", "radiomics+clinical"}
    assert (auc["value"] > 0.85).all(), auc
    assert ((auc["low"] <= auc["value"]) & (auc["value"] <= auc["high"])).all()
    importance = pd.read_csv(tmp_path / "reports" / "importance.csv")
    assert importance["feature"].iloc[0] == "signal"
    assert json.loads((tmp_path / "reports" / "summary.json").read_text())["best_model"] in set(auc["model"])


def test_without_clinical_columns_there_is_no_fusion_and_missing_inputs_are_named(tmp_path: Path):
    from components.classical import run

    config = _tables(tmp_path, with_clinical=False)
    assert set(run(config)["variant"]) == {"radiomics"}
    with pytest.raises(DataError, match="selected.json: not found"):
        run(config.model_copy(update={"selected": tmp_path / "missing" / "selected.json"}))


def test_data_without_both_classes_in_train_skips_the_baselines_without_failing(tmp_path: Path):
    from components.classical import run

    config = _tables(tmp_path, with_clinical=False)
    features = pd.read_csv(config.features)
    features.loc[features["split"] == "train", "label"] = "tumor"
    features.to_csv(config.features, index=False)
    assert run(config).empty
    assert "skipped" in json.loads((tmp_path / "reports" / "summary.json").read_text())
