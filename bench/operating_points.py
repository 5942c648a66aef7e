"""The trained model's ROC points and fixed-threshold figures on the workspace's held-out test split.

Run in a workspace after `tumorscope run` (e.g. `--data ../shared/data/masoud-224/Training --preset masoud`).
The evaluate stage reports the model at its validation-chosen operating threshold; this adds what the issue's
targets name, all from one pass over the test slices with ``models/``:
  - ROC-AUC, the best sensitivity at specificity >= --specificity and the best specificity at sensitivity >= --sensitivity;
  - the tumours missed and false alarms at that ROC point (the counts the targets allow);
  - 4-class accuracy, misses and false alarms at P(tumour) 0.5 and at the model's own threshold.

    .venv/bin/python bench/operating_points.py [--specificity 0.995] [--sensitivity 0.998]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def at_threshold(labels: np.ndarray, decided: np.ndarray) -> str:
    tumour, called = labels != "notumor", decided != "notumor"
    return (
        f"accuracy {np.mean(decided == labels):.4f} ({int(np.sum(decided != labels))} errors), "
        f"missed tumours {int(np.sum(tumour & ~called))}/{int(tumour.sum())}, false alarms {int(np.sum(~tumour & called))}/{int((~tumour).sum())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--specificity", type=float, default=0.995)
    parser.add_argument("--sensitivity", type=float, default=0.998)
    args = parser.parse_args()
    split_file, model_dir = args.workspace / "data" / "split.csv", args.workspace / "models"
    if not split_file.exists() or not (model_dir / "model.pt").exists():
        raise SystemExit(f"skipped: no trained model in {args.workspace.resolve()} (run `tumorscope run` there first)")
    from sklearn.metrics import roc_auc_score

    from components.evaluate import roc_points
    from components.imaging import read_slice
    from components.model import Classifier, decide, tumour_probability

    split = pd.read_csv(split_file)
    test = split[split["split"] == "test"]
    classifier = Classifier.load(model_dir)
    colour = classifier.spec.in_channels == 3
    paths = [str(args.workspace / path) for path in test["path"]]  # workspace-relative or absolute
    probabilities = classifier.predict_proba([read_slice(path, name=name, color=colour) for path, name in zip(paths, test["image_id"])])
    labels, score = test["label"].to_numpy(), tumour_probability(probabilities, classifier.spec)
    is_tumour = labels != "notumor"
    points = roc_points(is_tumour, score, specificity=args.specificity, sensitivity=args.sensitivity)
    sensitivity, specificity = points["sens_at_spec"], points["spec_at_sens"]
    print(f"{len(test)} test slices ({int(is_tumour.sum())} tumours), classes {classifier.spec.classes}")
    print(f"ROC-AUC {roc_auc_score(is_tumour, score):.5f}")
    print(
        f"best sensitivity at specificity >= {args.specificity}: {sensitivity:.4f} "
        f"({int(round((1 - sensitivity) * is_tumour.sum()))} tumours missed)"
    )
    print(f"best specificity at sensitivity >= {args.sensitivity}: {specificity:.4f}")
    print(
        "at P(tumour) 0.5: " + at_threshold(labels, decide(probabilities, classifier.spec.model_copy(update={"operating_threshold": 0.5})))
    )
    threshold = classifier.spec.operating_threshold
    print(f"at the model's threshold {threshold:.3f}: " + at_threshold(labels, decide(probabilities, classifier.spec)))


if __name__ == "__main__":
    main()
