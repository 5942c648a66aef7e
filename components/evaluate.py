"""Evaluate: the calibrated model on the untouched test split.

Writes DVC metrics (``reports/metrics.json``) and plots (ROC curve, confusion
pairs), logs the same numbers and files to the calibration's MLflow run (the one a version registers), and writes
the monitoring reference: image statistics and predictions of held-out images,
in exactly the columns the endpoint records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, f1_score, precision_score, roc_auc_score, roc_curve

from components import explain_report
from components.config import EvaluateConfig, load_params
from components.errors import DataError
from components.fairness import SUBGROUP_COLUMNS, with_age_band
from components.imaging import read_slice, slice_stats
from components.model import EMBEDDING_COLUMNS, Classifier, ModelSpec, decide, tumour_probability
from components.settings import get_settings

REFERENCE_FILE = Path("data/reference.csv")


def binary_metrics(is_tumour: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Tumour-vs-no-tumour metrics at a threshold on P(tumour)."""
    predicted = score >= threshold
    tn, fp, fn, tp = confusion_matrix(is_tumour, predicted, labels=[False, True]).ravel()
    both_classes = 0 < is_tumour.sum() < len(is_tumour)
    return {
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "precision": float(precision_score(is_tumour, predicted, zero_division=0)),
        "f1": float(f1_score(is_tumour, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(is_tumour, score)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(is_tumour, score)) if both_classes else float("nan"),
    }


def roc_points(is_tumour: np.ndarray, score: np.ndarray, specificity: float, sensitivity: float) -> dict[str, float]:
    """The best sensitivity at a specificity of at least ``specificity``, and the best specificity at a
    sensitivity of at least ``sensitivity``: the operating points screening targets name, whatever threshold gets there."""
    fpr, tpr, _ = roc_curve(is_tumour, score)
    return {"sens_at_spec": float(tpr[1 - fpr >= specificity].max()), "spec_at_sens": float((1 - fpr)[tpr >= sensitivity].max())}


def score_images(classifier: Classifier, paths: list[str], names: list[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Class probabilities, raw-image statistics and the embedding summary for each file (``names`` label errors
    instead of paths)."""
    images = [read_slice(path, name=name, color=True) for path, name in zip(paths, names or paths)]
    probabilities, features = classifier.predict(images)
    stats = pd.DataFrame([slice_stats(image) for image in images])
    stats[EMBEDDING_COLUMNS] = classifier.embeddings(features)
    return probabilities, stats


def metrics_for(spec: ModelSpec, labels: pd.Series, probabilities: np.ndarray) -> dict[str, float]:
    """Metrics of the answers the endpoint gives: labels and tumour calls at the model's operating threshold."""
    predicted = decide(probabilities, spec)
    is_tumour = (labels != spec.classes[spec.tumour_free_index]).to_numpy()
    score = tumour_probability(probabilities, spec)
    return {"accuracy": float(accuracy_score(labels, predicted)), **binary_metrics(is_tumour, score, spec.operating_threshold)}


def assess(classifier: Classifier, test: pd.DataFrame, min_group_size: int) -> tuple[dict, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Metrics (overall and worst subgroup), probabilities, image statistics and the subgroup table of one split."""
    from components.fairness import subgroup_table, summary

    spec = classifier.spec
    probabilities, stats = score_images(classifier, test["path"].tolist(), test["image_id"].tolist())
    metrics = metrics_for(spec, test["label"], probabilities)
    is_tumour = (test["label"] != spec.classes[spec.tumour_free_index]).to_numpy()
    subgroups = subgroup_table(test, is_tumour, tumour_probability(probabilities, spec) >= spec.operating_threshold)
    return {**metrics, **summary(subgroups, min_group_size)}, probabilities, stats, subgroups


def reference_table(spec: ModelSpec, stats: pd.DataFrame, probabilities: np.ndarray) -> pd.DataFrame:
    """The monitoring baseline, in the endpoint's record columns."""
    return stats.assign(
        predicted_label=decide(probabilities, spec),
        confidence=probabilities.max(1),
        tumour_probability=tumour_probability(probabilities, spec),
    )


def test_predictions(spec: ModelSpec, test: pd.DataFrame, probabilities: np.ndarray) -> pd.DataFrame:
    """Per test image (by pseudonym): what the gate's paired comparison with the champion resamples."""
    return pd.DataFrame(
        {
            "image_id": test["image_id"].to_numpy(),
            "tumour_probability": tumour_probability(probabilities, spec),
            "predicted": decide(probabilities, spec),
        }
    )


def _write_plots(report_dir: Path, spec: ModelSpec, labels: pd.Series, probabilities: np.ndarray) -> list[Path]:
    is_tumour = labels != spec.classes[spec.tumour_free_index]
    fpr, tpr, _ = roc_curve(is_tumour, tumour_probability(probabilities, spec))
    roc = report_dir / "roc.csv"
    pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(roc, index=False)
    confusion = report_dir / "confusion.csv"
    pd.DataFrame({"actual": labels.to_numpy(), "predicted": decide(probabilities, spec)}).to_csv(confusion, index=False)
    return [roc, confusion, _roc_png(report_dir, fpr, tpr)]


def _roc_png(report_dir: Path, fpr: np.ndarray, tpr: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(fpr, tpr, label="model")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    axis.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC, tumour vs no tumour (test split)")
    axis.legend(loc="lower right")
    path = report_dir / "roc.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _log_to_mlflow(run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient(get_settings().tracking_uri)
    for name, value in metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, f"test_{name}", value)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")


def _clinical_fusion(config: EvaluateConfig, classifier: Classifier, split: pd.DataFrame, test: pd.DataFrame, probabilities) -> dict:
    """The CNN fused with the clinical columns the data has (reports/statistics/fusion.json), next to the image
    alone."""
    from components.fusion import late_fusion, usable_columns

    fusion_file = config.report_dir / "statistics" / "fusion.json"
    fusion_file.unlink(missing_ok=True)
    val, spec = split[split["split"] == "val"], classifier.spec
    if not usable_columns(val):
        return {}
    val_probabilities, _ = score_images(classifier, val["path"].tolist(), val["image_id"].tolist())
    fusion = late_fusion(
        val, tumour_probability(val_probabilities, spec), test, tumour_probability(probabilities, spec),
        lambda frame: (frame["label"] != spec.classes[spec.tumour_free_index]).to_numpy(),
    )  # fmt: skip
    if fusion:
        fusion_file.write_text(json.dumps(fusion, indent=2))
        print(
            f"image + {', '.join(fusion['columns'])} (late fusion fitted on validation): test ROC-AUC "
            f"{fusion['image_roc_auc']:.4f} -> {fusion['fusion_roc_auc']:.4f}"
        )
    return fusion


def run(config: EvaluateConfig) -> dict[str, float]:
    if not config.split.exists():
        raise DataError(config.split, "split not found: run the split stage first")
    split = pd.read_csv(config.split)
    test = split[split["split"] == "test"]
    classifier = Classifier.load(config.model_dir)
    metrics, probabilities, stats, subgroups = assess(classifier, test, config.min_group_size)
    metrics["test_images"] = float(len(test))
    config.report_dir.mkdir(parents=True, exist_ok=True)
    subgroup_file = config.report_dir / "subgroups.csv"
    subgroups.to_csv(subgroup_file, index=False)
    metrics_file = config.report_dir / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2))
    plots = _write_plots(config.report_dir, classifier.spec, test["label"], probabilities)
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    reference = reference_table(classifier.spec, stats, probabilities)
    subgroups_of_test = with_age_band(test.reset_index(drop=True))
    for column in (c for c in SUBGROUP_COLUMNS if c in subgroups_of_test):
        reference[column] = subgroups_of_test[column].to_numpy()  # the metadata drift baseline
    reference.to_csv(REFERENCE_FILE, index=False)
    predictions_file = config.report_dir / "test_predictions.csv"
    test_predictions(classifier.spec, test, probabilities).to_csv(predictions_file, index=False)
    statistics = _write_statistics(config, classifier.spec, test["label"].to_numpy(), probabilities)
    metrics["ece"] = statistics.pop("ece")
    metrics.update(_early_detection(config, classifier, test))
    metrics_file.write_text(json.dumps(metrics, indent=2))
    fusion = _clinical_fusion(config, classifier, split, test, probabilities)
    identity = json.loads((config.model_dir / "model.json").read_text())
    run_id = identity["run_id"]  # the calibration's run: the one a registered version is
    explanations = explain_report.write(
        classifier, test, stats[EMBEDDING_COLUMNS].to_numpy(), identity.get("trained_run_id", run_id),
        config.report_dir / "explanations", config.explain_tumours,
    )  # fmt: skip
    files = [metrics_file, subgroup_file, REFERENCE_FILE, *plots, *config.report_dir.glob("statistics/*")]
    files += sorted((config.report_dir / "explanations").glob("*"))
    heatmaps = {f"heatmap_{k}": v for k, v in explanations.items()}
    _log_to_mlflow(run_id, {**metrics, **statistics, **heatmaps, **{k: v for k, v in fusion.items() if k.endswith("auc")}}, files)
    print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def _early_detection(config: EvaluateConfig, classifier: Classifier, test: pd.DataFrame) -> dict[str, float]:
    """The lesion-size curve on tumour-free test slices (reports/statistics/lesion_curve.csv) and its summary."""
    from components.config import NO_TUMOUR
    from components.lesion_curve import DETECTION_LEVEL, lesion_curve, smallest_detected

    negatives = test[test["label"] == NO_TUMOUR]
    if config.lesion_curve_slices == 0 or negatives.empty:
        return {}
    chosen = negatives.sample(min(len(negatives), config.lesion_curve_slices), random_state=0)
    images = [read_slice(path, name=name, color=True) for path, name in zip(chosen["path"], chosen["image_id"])]
    curve = lesion_curve(classifier, images)
    curve.to_csv(config.report_dir / "statistics" / "lesion_curve.csv", index=False)
    smallest = smallest_detected(curve)
    rates = ", ".join(f"{d:g} mm {r:.2f}" for d, r in zip(curve["diameter_mm"], curve["detection_rate"]))
    print(f"lesion-size curve on {len(images)} tumour-free test slices (0 mm = false positives): {rates}")
    print(f"smallest lesion found in {DETECTION_LEVEL:.0%} of slices: {smallest:g} mm")
    return {"smallest_lesion_mm": smallest} if np.isfinite(smallest) else {}


def _write_statistics(config: EvaluateConfig, spec: ModelSpec, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Bootstrap intervals, per-class metrics and the test reliability diagram under reports/statistics/;
    returns the interval bounds as flat metrics and the test ECE."""
    from components.intervals import bootstrap_intervals, calibration_error, per_class_table, reliability_table

    folder = config.report_dir / "statistics"
    folder.mkdir(parents=True, exist_ok=True)
    intervals = bootstrap_intervals(
        lambda rows: metrics_for(spec, pd.Series(labels[rows]), probabilities[rows]), len(labels), config.bootstrap_resamples
    )
    (folder / "metrics_ci.json").write_text(json.dumps(intervals, indent=2))
    per_class_table(labels, decide(probabilities, spec), probabilities, spec.classes).to_csv(folder / "per_class.csv", index=False)
    is_tumour = labels != spec.classes[spec.tumour_free_index]
    reliability = reliability_table(is_tumour, tumour_probability(probabilities, spec))
    reliability.to_csv(folder / "reliability.csv", index=False)
    shown = ", ".join(f"{name} {i['value']:.3f} [{i['low']:.3f}, {i['high']:.3f}]" for name, i in intervals.items())
    print(f"95% bootstrap intervals ({config.bootstrap_resamples} resamples): {shown}")
    flat = {f"{name}_ci_{end}": i[end] for name, i in intervals.items() for end in ("low", "high") if np.isfinite(i[end])}
    return {**flat, "ece": calibration_error(reliability)}


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().evaluate))


if __name__ == "__main__":
    main()
