"""What the evaluation shows of the model's reasoning: heatmaps on test tumours with masks, training curves and
an embedding map, as PNGs in ``reports/explanations/`` (and in the MLflow run).

Where the test split has lesion masks, Grad-CAM and occlusion heatmaps (and the lesion map of a model trained on
masks) are scored against them: the share of
heatmap mass inside the lesion (chance level = the lesion's share of the image) and the pointing game (the
hottest pixel inside the lesion, within half a Grad-CAM cell). A model that is right for the wrong reasons
shows here first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from components.imaging import read_slice
from components.model import Classifier
from components.train import SMALLER_SIZE


def heatmap_agreement(classifier: Classifier, tumours: pd.DataFrame, folder: Path, examples: int = 4) -> dict[str, float]:
    """Mean mass inside the lesion and pointing-game hit rate of both heatmaps on ``tumours`` (rows with a
    ``mask_path``); saves the first ``examples`` overlays."""
    from components.explain import MIN_CAM_WIDTH, gradcam, lesion_map, mass_inside, occlusion, overlay_png, pointing_game
    from components.features import read_mask

    size = classifier.spec.image_size
    methods = {"gradcam": gradcam, "occlusion": occlusion} | ({"lesion_map": lesion_map} if classifier.spec.lesion_head else {})
    scores: dict[str, list[float]] = {f"{method}_{score}": [] for method in methods for score in ("mass", "hit")} | {"chance": []}
    for index, row in enumerate(tumours.itertuples()):
        image = read_slice(row.path, name=row.image_id, color=True)
        mask = read_mask(Path(row.mask_path), size, row.image_id) > 0
        if not mask.any():
            continue
        maps = {method: explain(classifier, image) for method, explain in methods.items()}
        for method, heatmap in maps.items():
            scores[f"{method}_mass"].append(mass_inside(heatmap, mask))
            tolerance = size / MIN_CAM_WIDTH / 2 if method == "gradcam" else 0.0
            scores[f"{method}_hit"].append(float(pointing_game(heatmap, mask, tolerance)))
        scores["chance"].append(float(mask.mean()))
        if index < examples:
            for method, heatmap in maps.items():
                (folder / f"example_{index}_{method}.png").write_bytes(overlay_png(image, heatmap))
    # a heatmap with no mass at all (nothing speaks for a tumour) has no share inside: left out of the mean
    return {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan") for name, values in scores.items() if values}


CURVE = re.compile(rf"(train_loss|val_loss|val_auc|val_accuracy)({SMALLER_SIZE})?")  # progressive resizing's early epochs
COLOURS = {"train_loss": "C0", "val_loss": "C1", "val_auc": "C2", "val_accuracy": "C3"}  # a metric's early series dashed


def training_curves(run_id: str, path: Path) -> Path | None:
    """Loss and validation metrics per epoch, from the run's metric history, at the training step each epoch ended:
    a series validated at an early, smaller size (``train._val_key``) ends where the full-size one begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from components.settings import get_settings

    client = mlflow.MlflowClient(get_settings().tracking_uri)
    names = sorted(name for name in client.get_run(run_id).data.metrics if CURVE.fullmatch(name))
    histories = {name: client.get_metric_history(run_id, name) for name in names}
    if not any(histories.values()):
        return None
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, history in histories.items():
        metric, smaller = CURVE.fullmatch(name).groups()
        axis = losses if metric.endswith("loss") else scores
        axis.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3, label=name,
                  color=COLOURS[metric], linestyle="--" if smaller else "-")  # fmt: skip
    for axis, title in ((losses, "loss"), (scores, "validation")):
        axis.set(xlabel="training step (an epoch's end)", title=title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def embedding_map(features: np.ndarray, labels: np.ndarray, path: Path, seed: int = 0) -> Path | None:
    """t-SNE of the test images' penultimate features, coloured by their true label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    if len(features) < 10:
        return None
    points = TSNE(n_components=2, perplexity=min(30, len(features) // 4), random_state=seed, init="pca").fit_transform(features)
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for label in sorted(set(labels)):
        chosen = labels == label
        axis.scatter(points[chosen, 0], points[chosen, 1], s=8, label=f"{label} ({chosen.sum()})")
    axis.set(title="t-SNE of penultimate features (test split)", xticks=[], yticks=[])
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write(
    classifier: Classifier, test: pd.DataFrame, features: np.ndarray, training_run_id: str, folder: Path, max_tumours: int
) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    training_curves(training_run_id, folder / "training_curves.png")
    embedding_map(features, test["label"].to_numpy(), folder / "embedding_tsne.png")
    summary: dict[str, float] = {}
    if "mask_path" in test and max_tumours:
        from components.config import NO_TUMOUR

        tumours = test[(test["label"] != NO_TUMOUR) & test["mask_path"].notna()].head(max_tumours)
        if len(tumours):
            summary = heatmap_agreement(classifier, tumours, folder)
            print("heatmaps on " + f"{len(tumours)} test tumours with masks: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
