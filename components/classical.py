"""Classical: interpretable baselines on the radiomics table, alone and fused with clinical columns.

Logistic regression, an RBF SVM, a random forest and gradient boosting are fitted on the train rows of the
selected radiomic features (``reports/features/selected.json``, ranked on train rows only) and scored on
the same test rows as the CNN: tumour vs no tumour at P(tumour) ≥ 0.5, each metric with a bootstrap 95 %
interval. Where the data has clinical columns (age, sex), each model is also fitted on radiomics + clinical
(the fusion). The best model's permutation importance (on validation rows) says which features it uses.
Each model is an MLflow child run under one parent run per stage run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import NO_TUMOUR, ClassicalConfig, load_params
from components.errors import DataError
from components.intervals import bootstrap_intervals

CLINICAL_COLUMNS = ("age", "sex")


def make_model(name: str, seed: int):
    """A fresh estimator; every one of them gives class probabilities."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    models = {
        "logistic_regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")),
        "svm": lambda: make_pipeline(
            StandardScaler(), CalibratedClassifierCV(SVC(class_weight="balanced", random_state=seed), ensemble=False)
        ),
        "random_forest": lambda: RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1),
        "gradient_boosting": lambda: HistGradientBoostingClassifier(random_state=seed),
    }
    return models[name]()


def clinical_matrix(split: pd.DataFrame) -> pd.DataFrame | None:
    """Age (median-filled, with a missing flag) and sex (one-hot) where the data has them, else None."""
    columns = {}
    if "age" in split and split["age"].notna().any():
        age = pd.to_numeric(split["age"], errors="coerce")
        columns["clinical_age"] = age.fillna(age.median())
        columns["clinical_age_missing"] = age.isna().astype(float)
    if "sex" in split and split["sex"].notna().any():
        for value in sorted(split["sex"].dropna().astype(str).unique()):
            columns[f"clinical_sex_{value}"] = (split["sex"].astype(str) == value).astype(float)
    return pd.DataFrame(columns, index=split.index) if columns else None


def binary_scores(is_tumour: np.ndarray, score: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """The CNN's evaluation metrics (same code) at P(tumour) ≥ 0.5, on the resampled rows."""
    from components.evaluate import binary_metrics

    truth, predicted = is_tumour[rows], score[rows] >= 0.5
    binary = binary_metrics(truth, score[rows], 0.5)
    return {"accuracy": float((predicted == truth).mean()), **{name: binary[name] for name in ("sensitivity", "specificity", "roc_auc")}}


def _design(config: ClassicalConfig) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    for path in (config.features, config.selected, config.split):
        if not Path(path).exists():
            raise DataError(path, "not found: run the split and features stages first")
    table = pd.read_csv(config.features)
    selected = json.loads(Path(config.selected).read_text())["features"]
    split = pd.read_csv(config.split).set_index("image_id")
    table = table.set_index("image_id")
    variants = {"radiomics": selected}
    clinical = clinical_matrix(split.loc[table.index])
    if clinical is not None:
        table = table.join(clinical)
        variants["radiomics+clinical"] = selected + list(clinical.columns)
    return table, variants


def run(config: ClassicalConfig) -> pd.DataFrame:
    """Fit and score every model and variant; returns the metrics table (one row per model, variant, metric)."""
    import mlflow

    from components.settings import use_experiment

    table, variants = _design(config)
    parts = {part: table[table["split"] == part] for part in ("train", "val", "test")}
    if (parts["train"]["label"] == NO_TUMOUR).nunique() < 2 or parts["test"].empty:
        # a baseline, not a gate: data too small for it must not stop the pipeline
        reason = "skipped: the train rows need both tumour and no-tumour images, and the test rows may not be empty"
        config.report_dir.mkdir(parents=True, exist_ok=True)
        (config.report_dir / "summary.json").write_text(json.dumps({"skipped": reason}))
        print(reason)
        return pd.DataFrame(columns=["model", "variant", "metric", "value", "low", "high"])
    is_tumour = (parts["test"]["label"] != NO_TUMOUR).to_numpy()
    use_experiment(config.experiment)
    rows, fitted = [], {}
    with mlflow.start_run(run_name="classical-models"):
        for variant, columns in variants.items():
            for name in config.models:
                model = make_model(name, config.seed).fit(parts["train"][columns], parts["train"]["label"] != NO_TUMOUR)
                score = model.predict_proba(parts["test"][columns])[:, 1]
                intervals = bootstrap_intervals(
                    lambda r, s=score: binary_scores(is_tumour, s, r), len(score), config.bootstrap_resamples, config.seed
                )
                rows += [{"model": name, "variant": variant, "metric": m, **values} for m, values in intervals.items()]
                fitted[(name, variant)] = (model, columns, intervals["roc_auc"]["value"])
                with mlflow.start_run(run_name=f"{name} ({variant})", nested=True):
                    mlflow.log_params({"model": name, "variant": variant, "features": len(columns)})
                    mlflow.log_metrics({f"test_{m}": v["value"] for m, v in intervals.items() if np.isfinite(v["value"])})
        metrics = pd.DataFrame(rows)
        best = max(fitted, key=lambda key: fitted[key][2])
        importance = _importance(*fitted[best][:2], parts["val"], config.seed)
        _write(config, metrics, importance, best)
        mlflow.log_artifacts(str(config.report_dir), artifact_path="classical")
    return metrics


def _importance(model, columns: list[str], validation: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Permutation importance (drop in ROC-AUC when a column is shuffled) on validation rows."""
    from sklearn.inspection import permutation_importance

    if validation.empty or validation["label"].nunique() < 2:
        return pd.DataFrame(columns=["feature", "importance_mean", "importance_std"])
    result = permutation_importance(
        model, validation[columns], validation["label"] != NO_TUMOUR, scoring="roc_auc", n_repeats=5, random_state=seed
    )
    frame = pd.DataFrame({"feature": columns, "importance_mean": result.importances_mean, "importance_std": result.importances_std})
    return frame.sort_values("importance_mean", ascending=False)


def _write(config: ClassicalConfig, metrics: pd.DataFrame, importance: pd.DataFrame, best: tuple[str, str]) -> None:
    config.report_dir.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(config.report_dir / "metrics.csv", index=False)
    importance.to_csv(config.report_dir / "importance.csv", index=False)
    auc = metrics[metrics["metric"] == "roc_auc"].set_index(["model", "variant"])["value"]
    summary = {"best_model": best[0], "best_variant": best[1], "roc_auc": {f"{m} ({v})": float(a) for (m, v), a in auc.items()}}
    (config.report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for (model, variant), value in auc.items():
        print(f"{model:20s} {variant:20s} test ROC-AUC {value:.3f}")
    top = ", ".join(importance["feature"].head(5)) if len(importance) else "none (no validation rows)"
    print(f"best: {best[0]} on {best[1]}; its most important features: {top}")


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().classical))


if __name__ == "__main__":
    main()
