"""The trained model's ROC points and fixed-threshold figures on the workspace's held-out test split.

Run in a workspace after `tumorscope run` (e.g. `--data ../shared/data/masoud-224/Training --preset masoud`).
The evaluate stage reports the model at its validation-chosen operating threshold; this adds what the issue's
targets name, all from one pass over the test slices with the calibrated model (``models_calibrated/``):
  - ROC-AUC, the best sensitivity at specificity >= --specificity and the best specificity at sensitivity >= --sensitivity;
  - the tumours missed and false alarms at that ROC point (the counts the targets allow);
  - 4-class accuracy, misses and false alarms at P(tumour) 0.5 and at the model's own threshold;
  - with --floors: the threshold re-chosen on the validation slices for each specificity floor (as
    ``calibrate.specificity_floor`` would choose it: `dvc repro` then reruns calibrate onward, not training) and the test figures there;
  - with several --workspace (runs on the same split): each model, then the mean of their probabilities;
  - with --errors CSV: every test slice some model gets wrong at P(tumour) 0.5, each model's answer, and how many
    errors all models share (errors no seed or ensemble removes: hard or mislabelled slices, worth a reader's look).

    .venv/bin/python bench/operating_points.py [--workspace W ...] [--specificity 0.995] [--sensitivity 0.998] [--floors 0.85 0.9] [--errors E.csv]
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


def scored(classifier, workspace: Path, rows: pd.DataFrame) -> np.ndarray:
    """The workspace model's class probabilities for some of its split's rows."""
    from components.imaging import read_slice

    colour = classifier.spec.in_channels == 3
    paths = [str(workspace / path) for path in rows["path"]]  # workspace-relative or absolute
    return classifier.predict_proba([read_slice(path, name=name, color=colour) for path, name in zip(paths, rows["image_id"])])


def calibrated(workspace: Path) -> Path:
    """The model the evaluate stage scored: the calibrate stage's output (``models/`` in workspaces made before it)."""
    from components.calibrate import refuse_uncalibrated
    from components.errors import TumorScopeError

    folder = workspace / "models_calibrated"
    if folder.exists():
        return folder
    try:
        refuse_uncalibrated(workspace / "models")
    except TumorScopeError as exc:
        raise SystemExit(str(exc)) from None
    return workspace / "models"


def report(name: str, spec, labels: np.ndarray, probabilities: np.ndarray, args, validation: tuple | None) -> None:
    from sklearn.metrics import roc_auc_score

    from components.calibrate import choose_operating_threshold
    from components.config import CalibrateConfig
    from components.evaluate import roc_points
    from components.model import decide, tumour_probability

    score, is_tumour = tumour_probability(probabilities, spec), labels != "notumor"
    points = roc_points(is_tumour, score, specificity=args.specificity, sensitivity=args.sensitivity)
    sensitivity, specificity = points["sens_at_spec"], points["spec_at_sens"]
    print(f"{name}: {len(labels)} test slices ({int(is_tumour.sum())} tumours), classes {spec.classes}")
    print(f"  ROC-AUC {roc_auc_score(is_tumour, score):.5f}")
    print(
        f"  best sensitivity at specificity >= {args.specificity}: {sensitivity:.4f} ({int(round((1 - sensitivity) * is_tumour.sum()))} tumours missed)"
    )
    print(f"  best specificity at sensitivity >= {args.sensitivity}: {specificity:.4f}")
    print("  at P(tumour) 0.5: " + at_threshold(labels, decide(probabilities, spec.model_copy(update={"operating_threshold": 0.5}))))
    if validation is None:
        print(f"  at the model's threshold {spec.operating_threshold:.3f}: " + at_threshold(labels, decide(probabilities, spec)))
        return
    val_labels, val_probabilities = validation
    val_score = tumour_probability(val_probabilities, spec)
    for floor in args.floors:
        config = CalibrateConfig(target_sensitivity=args.target_sensitivity, specificity_floor=floor)
        threshold = choose_operating_threshold(val_score, val_labels != "notumor", config)["operating_threshold"]
        chosen = decide(probabilities, spec.model_copy(update={"operating_threshold": threshold}))
        print(f"  floor {floor} (target sensitivity {args.target_sensitivity}): threshold {threshold:.3f}: " + at_threshold(labels, chosen))


def shared_errors(rows: pd.DataFrame, decisions: list[np.ndarray], out: Path) -> None:
    """Writes the slices any model gets wrong and prints how many every model gets wrong."""
    labels = rows["label"].to_numpy()
    wrong = np.stack([decided != labels for decided in decisions])
    table = pd.DataFrame({"path": rows["path"].to_numpy(), "label": labels})
    for index, decided in enumerate(decisions, start=1):
        table[f"model_{index}"] = decided
    table["models_wrong"] = wrong.sum(axis=0)
    table = table[table["models_wrong"] > 0].sort_values(["models_wrong", "label"], ascending=[False, True])
    table.to_csv(out, index=False)
    every = table[table["models_wrong"] == len(decisions)]
    kinds = (every["label"] + " -> " + every["model_1"]).value_counts().to_dict()
    print(
        f"errors at P(tumour) 0.5 made by every one of {len(decisions)} models: {len(every)} of {int(wrong.any(axis=0).sum())} slices any model gets wrong {kinds}; all written to {out}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, action="append", help="a workspace after `tumorscope run` (repeat: several models)")
    parser.add_argument("--specificity", type=float, default=0.995)
    parser.add_argument("--sensitivity", type=float, default=0.998)
    parser.add_argument("--floors", type=float, nargs="*", default=[], help="specificity floors to re-choose the threshold with")
    parser.add_argument("--target-sensitivity", type=float, default=0.998)
    parser.add_argument("--errors", type=Path, help="CSV of the test slices any model gets wrong at P(tumour) 0.5")
    args = parser.parse_args()
    workspaces = args.workspace or [Path(".")]
    for workspace in workspaces:
        if not (workspace / "data" / "split.csv").exists() or not (calibrated(workspace) / "model.pt").exists():
            raise SystemExit(f"skipped: no trained model in {workspace.resolve()} (run `tumorscope run` there first)")
    from components.model import Classifier, decide

    tests, decisions, validations, first_split = [], [], [], None
    for workspace in workspaces:
        classifier = Classifier.load(calibrated(workspace))
        spec = classifier.spec
        split = pd.read_csv(workspace / "data" / "split.csv")
        first_split = split[["path", "split"]] if first_split is None else first_split
        if not split[["path", "split"]].equals(first_split):
            raise SystemExit(f"{workspace}: another split than {workspaces[0]}'s: the models cannot be averaged slice by slice")
        rows, val_rows = split[split["split"] == "test"], split[split["split"] == "val"]
        probabilities = scored(classifier, workspace, rows)
        tests.append(probabilities)
        decisions.append(decide(probabilities, spec.model_copy(update={"operating_threshold": 0.5})))
        validation = None
        if args.floors:
            validations.append(scored(classifier, workspace, val_rows))
            validation = (val_rows["label"].to_numpy(), validations[-1])
        report(str(workspace), spec, rows["label"].to_numpy(), probabilities, args, validation)
    if len(workspaces) > 1:
        validation = (val_rows["label"].to_numpy(), np.mean(validations, axis=0)) if args.floors else None
        report(f"mean of {len(workspaces)} models", spec, rows["label"].to_numpy(), np.mean(tests, axis=0), args, validation)
    if args.errors:
        shared_errors(rows, decisions, args.errors)


if __name__ == "__main__":
    main()
