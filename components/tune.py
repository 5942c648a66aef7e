"""Tune: an Optuna study over the training search space in params.yaml, scored by cross-validation.

Each trial trains on the split's subject-grouped, stratified folds (the split stage's ``fold`` column; the
test split is never touched) and scores the mean validation ROC-AUC over ``tune.folds`` folds. The study
lives in SQLite (``tune.storage``), so a stopped tuning run continues where it stopped; each trial is an
MLflow child run under one parent run. With ``--apply`` the best values are written into params.yaml's
``train`` section (comments kept), where the next ``dvc repro`` uses them.

    tumorscope tune [--trials 8] [--apply]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from components.config import PARAMS_FILE, TrainConfig, TuneConfig, load_params
from components.errors import DataError, TumorScopeError


def fold_split(split: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows outside the test split, with ``fold`` as validation and the other folds as training."""
    rows = split[split["fold"] >= 0].copy()
    rows["split"] = (rows["fold"] == fold).map({True: "val", False: "train"})
    return rows


def suggest(trial, space: dict[str, dict]) -> dict:
    """Values for one trial: ``{low, high[, log]}`` is a float range (int when both ends are ints), ``{choices}`` a list."""
    values = {}
    for name, dimension in space.items():
        if "choices" in dimension:
            values[name] = trial.suggest_categorical(name, dimension["choices"])
        elif isinstance(dimension["low"], int) and isinstance(dimension["high"], int):
            values[name] = trial.suggest_int(name, dimension["low"], dimension["high"], log=dimension.get("log", False))
        else:
            values[name] = trial.suggest_float(name, dimension["low"], dimension["high"], log=dimension.get("log", False))
    return values


def run(tune: TuneConfig, train: TrainConfig, trials: int | None = None) -> dict:
    """Run (or continue) the study; returns the best trial's values and score."""
    import mlflow
    import optuna

    from components.settings import use_experiment
    from components.train import validation_auc

    if not train.split.exists():
        raise DataError(train.split, "split not found: run the split stage first")
    split = pd.read_csv(train.split)
    folds = sorted(f for f in split["fold"].unique() if f >= 0)[: tune.folds]
    if len(folds) < 2:
        raise DataError(train.split, "fewer than 2 cross-validation folds: set split.folds ≥ 2 (and enough subjects)")
    unknown = set(tune.space) - set(TrainConfig.model_fields)
    if unknown:
        raise TumorScopeError(f"tune.space: {', '.join(sorted(unknown))} are not train parameters")
    tune.storage.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=tune.study, storage=f"sqlite:///{tune.storage.resolve()}", direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=tune.seed),
    )  # fmt: skip
    use_experiment(tune.experiment)

    def objective(trial) -> float:
        values = suggest(trial, tune.space)
        # a trial scores one network: an ensemble's networks would all share the values tried
        config = train.model_copy(update={"members": 1, **values, "epochs": tune.epochs, "resume": False})
        scores = [validation_auc(config, fold_split(split, fold)) for fold in folds]
        score = float(pd.Series(scores).mean())
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params({**values, "epochs": tune.epochs, "folds": len(folds)})
            mlflow.log_metrics({"cv_roc_auc": score, **{f"fold_{f}_roc_auc": s for f, s in zip(folds, scores) if math.isfinite(s)}})
        print(f"trial {trial.number}: cv ROC-AUC {score:.4f} with {values}", flush=True)
        return score if math.isfinite(score) else 0.0

    with mlflow.start_run(run_name=f"tune-{tune.study}"):
        study.optimize(objective, n_trials=trials or tune.trials)
        best = {"values": study.best_trial.params, "cv_roc_auc": study.best_value, "trials": len(study.trials)}
        mlflow.log_metric("best_cv_roc_auc", study.best_value)
        mlflow.log_dict(best, "tune/best.json")
    return best


def apply_to_params(values: dict, path: Path = PARAMS_FILE) -> None:
    """Write the values into params.yaml's train section, keeping its comments and order."""
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load(path.read_text())
    for name, value in values.items():
        params["train"][name] = value
    with path.open("w") as handle:
        yaml.dump(params, handle)
    load_params(path)  # still valid


def main(trials: int | None = None, apply: bool = False) -> dict:
    params = load_params()
    best = run(params.tune, params.train_as_run, trials)
    report = Path("reports/tune")
    report.mkdir(parents=True, exist_ok=True)
    (report / "best.json").write_text(json.dumps(best, indent=2))
    print(f"best of {best['trials']} trials: cv ROC-AUC {best['cv_roc_auc']:.4f} with {best['values']}")
    if apply:
        apply_to_params(best["values"])
        print("written to params.yaml (train section); `dvc repro` retrains with them")
    return best


if __name__ == "__main__":
    import argparse

    from components.stage import run_stage

    parser = argparse.ArgumentParser(description="Optuna study over params.yaml's tune.space, scored by grouped cross-validation.")
    parser.add_argument("--trials", type=int, default=None, help="trials to add to the study (default: tune.trials)")
    parser.add_argument("--apply", action="store_true", help="write the best values into params.yaml's train section")
    arguments = parser.parse_args()
    run_stage(lambda: main(arguments.trials, arguments.apply))
