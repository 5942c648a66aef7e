"""Quality on real data: grouped k-fold cross-validation of the train stage's network with a data set's preset.

Every image of a patient (LGG) or of a near-duplicate group (Masoud, which has no patient IDs) falls in one fold.
Per fold: test on the held-out fold; validate (calibration, operating threshold) on the next fold, or on one
of --val-parts grouped parts of it; train on the rest (the last epoch's weights: nothing is picked on validation).
It prints, per fold and as mean ± SD across folds:
  - multi-class accuracy at the operating threshold;
  - tumour-vs-none ROC-AUC, sensitivity and specificity at the threshold chosen on the validation fold;
  - the ROC points the targets name: sensitivity at specificity >= --specificity (and the reverse);
  - the lesion-size curve's summary on the fold's tumour-free slices (smallest lesion found in 90 %).

  .venv/bin/python bench/quality.py --data ../shared/data/lgg-kaggle_3m/kaggle_3m --preset lgg --folds 5 --val-parts 2
  .venv/bin/python bench/quality.py --data ../shared/data/masoud-224/Training --preset masoud --folds 5 --max-folds 1
  .venv/bin/python bench/quality.py --data ../shared/data/lgg-kaggle_3m/kaggle_3m --preset lgg \
      --pretrain-data ../shared/data/masoud-224/Training      (pretrained once, as the pretrain stage does)

Training time per fold is printed too: the targets are set for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def ingest(data: Path, workspace: Path, mirror_correlation: float | None) -> pd.DataFrame:
    from components.cli import REAL_DATA_DUPLICATE_CORRELATION
    from components.config import IngestConfig
    from components.ingest import run

    config = IngestConfig(
        source=data, out=workspace / "manifest.csv", derived_dir=workspace / "derived", feedback_dir=workspace / "feedback",
        duplicate_correlation=REAL_DATA_DUPLICATE_CORRELATION, mirror_correlation=mirror_correlation,
    )  # fmt: skip
    run(config)
    return pd.read_csv(config.out)


def folds_of(manifest: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Subject- and near-duplicate-grouped, label-stratified folds (the split stage's leakage groups)."""
    from sklearn.model_selection import StratifiedGroupKFold

    from components.split import leakage_groups

    fold = np.empty(len(manifest), int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for index, (_, test) in enumerate(splitter.split(manifest, manifest["label"], leakage_groups(manifest))):
        fold[test] = index
    return fold


def fold_roles(manifest: pd.DataFrame, fold: np.ndarray, k: int, val_parts: int, seed: int) -> np.ndarray:
    """Fold k tests; one of ``val_parts`` grouped parts of the next fold validates (calibration, threshold); the rest
    trains. With 5 folds and val_parts 2: train 70 %, val 10 %, test 20 %, near the split stage's 65/15/20."""
    from sklearn.model_selection import StratifiedGroupKFold

    from components.split import leakage_groups

    folds = int(fold.max()) + 1
    role = np.where(fold == k, "test", "train").astype(object)
    following = np.flatnonzero(fold == (k + 1) % folds)
    if val_parts == 1:
        role[following] = "val"
        return role.astype(str)
    rows = manifest.iloc[following]
    splitter = StratifiedGroupKFold(n_splits=val_parts, shuffle=True, random_state=seed)
    _, validation = next(splitter.split(rows, rows["label"], leakage_groups(rows)))
    role[following[validation]] = "val"
    return role.astype(str)


def lesion_peaks(classifier, images: list[np.ndarray]) -> np.ndarray:
    """Each slice's highest lesion-map logit (a model trained with train.mask_weight > 0)."""
    import torch

    peaks = []
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            batch = torch.from_numpy(classifier.batch(images[start : start + 64]))
            peaks.append(classifier.net.classify(batch)[1].flatten(1).amax(1).float().numpy())
    return np.concatenate(peaks)


VALIDATION_FIGURES = ("val_sensitivity_at_threshold", "val_specificity_at_threshold")  # where the threshold was chosen


def one_fold(params, manifest: pd.DataFrame, role: np.ndarray, k: int, level: float) -> tuple[dict[str, float], pd.DataFrame]:
    """The fold's figures and its test slices' P(tumour)."""
    from sklearn.metrics import roc_auc_score

    from components.config import NO_TUMOUR
    from components.evaluate import metrics_for, roc_points
    from components.imaging import read_slice
    from components.lesion_curve import lesion_curve, smallest_detected
    from components.model import Classifier, tumour_probability
    from components.train import fit_classifier

    split = manifest.assign(split=role)
    started = time.perf_counter()
    classifier, fitted_on_validation = fit_classifier(params.train, split[split["split"] != "test"], params.calibrate)
    minutes = (time.perf_counter() - started) / 60
    classifier.save(Path.cwd() / f"fold{k}")  # in the run's workspace (printed), for analyses after the run
    test = split[split["split"] == "test"]
    images = [read_slice(path, name=name, color=True) for path, name in zip(test["path"], test["image_id"])]
    probabilities = classifier.predict_proba(images)
    metrics = metrics_for(classifier.spec, test["label"], probabilities)
    is_tumour = (test["label"] != NO_TUMOUR).to_numpy()
    scores = test[["image_id", "subject", "label"]].assign(fold=k, p_tumour=tumour_probability(probabilities, classifier.spec))
    metrics |= roc_points(is_tumour, scores["p_tumour"].to_numpy(), specificity=level, sensitivity=level)
    if classifier.spec.lesion_head:  # how far the lesion map's strongest cell alone ranks the slices
        scores["lesion_peak"] = lesion_peaks(classifier, images)
        metrics["lesion_map_auc"] = float(roc_auc_score(is_tumour, scores["lesion_peak"]))
    alone = {}  # the same networks answering otherwise: what the vote and the ensemble add
    if classifier.spec.lesion_vote:
        alone["head"] = Classifier(classifier.spec.model_copy(update={"lesion_vote": False}), classifier.net)
    if classifier.spec.members > 1:
        alone |= {f"member{n}": member for n, member in enumerate(classifier.members(), 1)}
    for name, other in alone.items():
        score = tumour_probability(other.predict_proba(images), other.spec)
        scores[f"p_tumour_{name}"] = score
        metrics[f"{name}_auc"] = float(roc_auc_score(is_tumour, score))
        metrics[f"{name}_sens_at_spec"] = roc_points(is_tumour, score, specificity=level, sensitivity=level)["sens_at_spec"]
    negatives = [image for image, tumour in zip(images, is_tumour) if not tumour][:100]
    metrics["smallest_lesion_mm"] = smallest_detected(lesion_curve(classifier, negatives)) if negatives else float("nan")
    validation = split[split["split"] == "val"]
    return {
        "fold": k, "train_minutes": minutes, "test_images": len(test), "subjects": test["subject"].nunique(),
        "train_subjects": split.loc[split["split"] == "train", "subject"].nunique(), "val_subjects": validation["subject"].nunique(),
        "operating_threshold": classifier.spec.operating_threshold,
        **{name: fitted_on_validation[name] for name in VALIDATION_FIGURES if name in fitted_on_validation}, **metrics,
    }, scores  # fmt: skip


def pretrained(params, source: Path, workspace: Path):
    """``params`` with training starting from weights pretrained on ``source``, as the pretrain stage makes them
    (its images that copy one of the benchmark's are left out). Once for every fold: the copies are checked against
    the whole set, and no fold's labels are used."""
    from components import pretrain, pretrain_set
    from components.cli import REAL_DATA_DUPLICATE_CORRELATION

    config = params.pretrain.model_copy(
        update={
            "source": source,
            "target": workspace / "manifest.csv",
            "data_dir": workspace / "pretrain",
            "out_dir": workspace / "models_pretrained",
        }
    )
    started = time.perf_counter()
    ingest = params.ingest.model_copy(  # the caches where the run's end removes them
        update={
            "out": workspace / "manifest.csv",
            "duplicate_correlation": REAL_DATA_DUPLICATE_CORRELATION,
            "cache_dir": workspace / "data" / "cache",
        }
    )
    pretrain_set.run(config, ingest)
    pretrain.run(config, params.train)
    print(f"pretrained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    pretrained = params.model_copy(update={"pretrain": config})
    return pretrained.model_copy(update={"train": pretrained.train_as_run})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--preset", default=None, help="params/<name>.yaml merged over params.yaml (its train and calibrate sections)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-folds", type=int, default=None, help="run only N folds (time)")
    parser.add_argument("--start-fold", type=int, default=0, help="the first fold to run (to finish a run in parts)")
    parser.add_argument("--val-parts", type=int, default=1, help="validate on 1/N of the next fold, train on the rest (1: all of it)")
    parser.add_argument("--specificity", type=float, default=0.95, help="ROC operating level for both points")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--init-weights", type=Path, default=None, help="train.init_weights for every fold (a weights file)")
    parser.add_argument(
        "--pretrain-data", type=Path, default=None,
        help="pretrain on this set first, as the pretrain stage does (its copies of --data left out); every fold starts from it",
    )  # fmt: skip
    args = parser.parse_args()
    if args.val_parts < 1:
        parser.error("--val-parts must be 1 or more")
    if args.init_weights and args.pretrain_data:
        parser.error("--init-weights and --pretrain-data both name where training starts: give one")
    pretrain_data = args.pretrain_data.resolve() if args.pretrain_data else None  # before the move into the workspace
    if pretrain_data is not None and not pretrain_data.is_dir():
        parser.error(f"--pretrain-data {args.pretrain_data}: not a folder")
    if not args.data.is_dir():
        raise SystemExit(f"skipped: {args.data} not found (the shared real data sets are not on this machine)")
    from components.config import params_with_preset

    params = params_with_preset(args.preset, PROJECT / "params.yaml")
    init_weights = args.init_weights or params.train.init_weights
    if init_weights is not None:  # resolved here: they are read after the move into the workspace below
        params = params.model_copy(update={"train": params.train.model_copy(update={"init_weights": init_weights.resolve()})})
    config = params.train
    data = args.data.resolve()
    workspace = Path(tempfile.mkdtemp(prefix="tumorscope-quality-"))
    os.chdir(workspace)  # the ingest and prepared-image caches live here
    # the prepared images (5-7 GB at 256 px) go when the run ends, finished or failed; scores and fold weights stay
    atexit.register(shutil.rmtree, workspace / "data" / "cache", True)
    manifest = ingest(data, workspace, params.ingest.mirror_correlation)  # as the pretraining set is grouped
    if pretrain_data is not None:
        params = pretrained(params, pretrain_data, workspace)
    fold = folds_of(manifest, args.folds, args.seed)
    print(
        f"{len(manifest)} images, {manifest['subject'].nunique()} subjects, {args.folds} grouped folds; train: {config.model_dump(include={'network', 'image_size', 'in_channels', 'channels', 'blocks', 'epochs', 'precision'})}"
    )
    rows, scores = [], []
    for k in range(args.start_fold, min(args.folds, args.start_fold + (args.max_folds or args.folds))):
        role = fold_roles(manifest, fold, k, args.val_parts, args.seed)
        figures, fold_scores = one_fold(params, manifest, role, k, args.specificity)
        rows.append(figures)
        scores.append(fold_scores)
        print(
            " ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in rows[-1].items()), flush=True
        )
    table = pd.DataFrame(rows)
    columns = [
        "accuracy",
        "roc_auc",
        "lesion_map_auc",
        "head_auc",
        "head_sens_at_spec",
        "sensitivity",
        "specificity",
        "sens_at_spec",
        "spec_at_sens",
        "smallest_lesion_mm",
        "train_minutes",
    ]
    columns += [c for c in table if c.startswith("member")]  # an ensemble's networks alone, in one_fold's (numeric) order
    summary = table[[c for c in columns if c in table]].agg(["mean", "std", "min", "max"]).T
    print(f"\nacross {len(table)} folds (sens_at_spec: best sensitivity at specificity >= {args.specificity}; spec_at_sens: the reverse)")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    pd.concat(scores).to_csv(workspace / "test_scores.csv", index=False)
    print(f"per-slice test scores (pseudonymised ids): {workspace / 'test_scores.csv'}")


if __name__ == "__main__":
    main()
