"""How much of a series-slice data set's error sits next to the annotation's edge, from bench/quality.py's saved scores.

LGG labels a slice tumour-positive when its mask is non-empty. Some of the confident false alarms of the
cross-validation are slices next to a patient's annotated tumour that show the same FLAIR signal with an empty
mask (seen by eye in one fold-4 patient: three slices below the first annotated one, each P(tumour) >= 0.96): the
reference standard, not the model, may be wrong there. This prints, per fold of one or more quality.py workspaces, ROC-AUC and the best sensitivity at
specificity >= --specificity with every test slice (the figures the targets use), then without the tumour-free
slices within k slices of an annotated tumour slice of the same series. It is a sensitivity analysis of the
reference standard, not a replacement for the first column. Slice numbers come from the file names (``_<n>.png``).

    .venv/bin/python bench/annotation_margin.py /tmp/tumorscope-quality-XXXX [...] [--margins 1 2 3] [--review alarms.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def distance_to_annotation(rows: pd.DataFrame) -> np.ndarray:
    """Per slice: how many slices away the nearest annotated tumour slice of its series is (inf: none)."""
    from components.config import NO_TUMOUR

    distance = pd.Series(np.inf, index=rows.index)
    for _, series in rows.groupby("series"):
        tumour_slices = series.loc[series["label"] != NO_TUMOUR, "slice"].to_numpy()
        if len(tumour_slices):
            distance[series.index] = np.abs(series["slice"].to_numpy()[:, None] - tumour_slices[None, :]).min(axis=1)
    return distance.to_numpy()


def fold_rows(workspace: Path) -> pd.DataFrame:
    """The workspace's test scores with each slice's series (its folder: one study) and number in it."""
    scores = pd.read_csv(workspace / "test_scores.csv")
    paths = pd.read_csv(workspace / "manifest.csv", usecols=["image_id", "path"])
    rows = scores.merge(paths, on="image_id", how="left", validate="one_to_one")
    from components.ingest import LGG_SLICE_NUMBER  # ingest's own rule for a series slice's number

    numbers = rows["path"].astype(str).map(lambda path: (found := LGG_SLICE_NUMBER.search(Path(path).stem)) and found[1])
    if numbers.isna().any():
        raise SystemExit(f"{workspace}: file names without a slice number (_<n>.png): not a series-slice data set")
    series = rows["path"].map(lambda path: Path(path).parent.name)
    return rows.assign(slice=numbers.astype(int), series=series).drop(columns="path").reset_index(drop=True)


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from components.config import NO_TUMOUR
    from components.evaluate import roc_points
    from components.model import threshold_for_specificity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspaces", nargs="+", type=Path, help="bench/quality.py workspaces (each has test_scores.csv)")
    parser.add_argument("--margins", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--specificity", type=float, default=0.95)
    parser.add_argument("--review", type=Path, help="write the false alarms at --specificity here (CSV, pseudonyms) for a reader")
    args = parser.parse_args()
    rows = pd.concat([fold_rows(workspace) for workspace in args.workspaces])
    if rows["image_id"].duplicated().any():
        raise SystemExit("the workspaces share test slices (the same fold twice?): give each fold once")
    false_alarms = []
    for fold, fold_scores in rows.groupby("fold"):
        fold_scores = fold_scores.reset_index(drop=True)
        is_tumour = (fold_scores["label"] != NO_TUMOUR).to_numpy()
        distance, score = distance_to_annotation(fold_scores), fold_scores["p_tumour"].to_numpy()
        alarm = ~is_tumour & (score >= threshold_for_specificity(score, is_tumour, args.specificity))
        false_alarms.append(fold_scores.assign(slices_from_annotation=distance)[alarm])
        figures = []
        for margin in [0, *args.margins]:
            kept = is_tumour | (distance > margin)
            auc = roc_auc_score(is_tumour[kept], score[kept])
            sensitivity = roc_points(is_tumour[kept], score[kept], args.specificity, 0.5)["sens_at_spec"]
            name = "all slices" if margin == 0 else f"without {int((~kept).sum())} tumour-free within {margin}"
            figures.append(f"{name}: AUC {auc:.4f}, sens {sensitivity:.3f}")
        print(f"fold {fold + 1}: " + "; ".join(figures))
    if args.review:  # image and subject pseudonyms only: the workspace's manifest.csv maps them to files for the reader
        columns = ["fold", "image_id", "subject", "slice", "slices_from_annotation", "p_tumour"]
        listed = pd.concat(false_alarms).assign(fold=lambda alarms: alarms["fold"] + 1)  # numbered as printed
        listed[columns].sort_values(["fold", "subject", "slice"]).to_csv(args.review, index=False)
        print(f"false alarms at specificity {args.specificity} for a reader: {args.review}")


if __name__ == "__main__":
    main()
