"""Calibrate: how the trained networks answer, fitted on the validation split after training.

A softmax temperature (temperature scaling), the operating threshold on P(tumour) (``target_sensitivity``, raised
by ``specificity_floor``) and the embedding summary the drift monitor compares traffic with. None of them changes a
weight, so they are a stage of their own: a new operating point reruns this stage and the ones after it, not
training (30 minutes on Masoud).

Each calibration is its own MLflow run, in the training run's experiment and tagged with it: the networks (logged
here, not by training: a few MB per calibration), the spec they answer by, the training params and this stage's own. A registered version is
that one run, so re-thresholding never rewrites a version already registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import CalibrateConfig, load_params
from components.errors import DataError, TumorScopeError
from components.model import Classifier
from components.settings import get_settings

MLFLOW_REQUIREMENTS = ["torch==2.13.0", "monai==1.6.1", "numpy<3"]
TRAINED_RUN_TAG = "tumorscope.trained_run"
STARTING_POINT_TAGS = ("tumorscope.pretrained_run", "tumorscope.init_weights_hash")  # set on the training run (train.py)


def fit_on_validation(classifier: Classifier, validation: pd.DataFrame, config: CalibrateConfig) -> dict[str, float]:
    """Set how ``classifier`` answers (mirror averaging, lesion vote), then fit the embedding summary's PCA, the
    temperature and the operating threshold on validation images (seen neither in training nor in the test) into
    it; what was fitted, and the figures there."""
    from components.dataset import prepared_images
    from components.model import EmbeddingProjection, expected_calibration_error, fit_temperature, tumour_probability

    spec = classifier.spec
    spec.flip_averaging = config.flip_averaging
    spec.lesion_vote = config.lesion_vote and spec.lesion_head  # a data set without masks trained no lesion map
    images = prepared_images(validation, spec.image_size, channels=spec.in_channels)

    def predicted() -> tuple[np.ndarray, np.ndarray]:
        parts = [classifier.predict_prepared(images[start : start + 256]) for start in range(0, len(images), 256)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([f for _, f in parts])

    spec.temperature = 1.0
    probabilities, features = predicted()
    classifier.projection = EmbeddingProjection.fit(features, images=images)
    labels = validation["label"].map({label: i for i, label in enumerate(spec.classes)}).to_numpy()
    spec.temperature = fit_temperature(np.log(np.clip(probabilities, 1e-12, 1)), labels)
    calibrated = predicted()[0]  # the scores the endpoint computes, so the threshold sits where it will be compared
    is_tumour = labels != spec.tumour_free_index
    operating_point = choose_operating_threshold(tumour_probability(calibrated, spec), is_tumour, config)
    spec.operating_threshold = operating_point["operating_threshold"]
    return {
        "calibration_temperature": spec.temperature,
        **operating_point,
        "val_ece_uncalibrated": expected_calibration_error(probabilities, labels),
        "val_ece_calibrated": expected_calibration_error(calibrated, labels),
    }


def choose_operating_threshold(score: np.ndarray, is_tumour: np.ndarray, config: CalibrateConfig) -> dict[str, float]:
    """P(tumour) at which the model answers 'tumour': the one for ``calibrate.target_sensitivity`` (0.5 without
    one), raised where it would cost more validation specificity than ``calibrate.specificity_floor`` allows.
    Raising it gives up sensitivity in the open: both thresholds and the validation figures at the chosen one go to
    the run and the model card (a figure without the slices to define it is left out, not NaN)."""
    from components.model import threshold_for_sensitivity, threshold_for_specificity

    for_target = 0.5 if config.target_sensitivity is None else threshold_for_sensitivity(score, is_tumour, config.target_sensitivity)
    threshold = for_target
    if config.specificity_floor is not None and (~is_tumour).any():
        threshold = max(for_target, threshold_for_specificity(score, is_tumour, config.specificity_floor))
    point = {"operating_threshold": threshold, "threshold_for_target_sensitivity": for_target}
    if is_tumour.any():
        point["val_sensitivity_at_threshold"] = float((score[is_tumour] >= threshold).mean())
    if (~is_tumour).any():
        point["val_specificity_at_threshold"] = float((score[~is_tumour] < threshold).mean())
    if threshold > for_target:
        print(
            f"operating threshold raised from {for_target:.3g} (calibrate.target_sensitivity) to {threshold:.3g} by "
            f"calibrate.specificity_floor {config.specificity_floor}: validation sensitivity there "
            f"{point.get('val_sensitivity_at_threshold', float('nan')):.3f}",
            flush=True,
        )
    return point


def refuse_uncalibrated(folder: Path) -> None:
    """A model folder used to answer (batch prediction, benches) must not be the train stage's networks, which answer
    at temperature 1 and threshold 0.5 until this stage has run: the train stage marks them ``calibrated: false``."""
    spec_file = folder / "model.json"
    if spec_file.exists() and json.loads(spec_file.read_text()).get("calibrated") is False:
        raise TumorScopeError(
            f"{folder}: the train stage's networks, not yet calibrated: pass the calibrate stage's folder (models_calibrated)"
        )


def trained_networks(config: CalibrateConfig) -> tuple[dict, Classifier]:
    """What the train stage left (its run id, data hash, spec and weights), or a DataError saying what is missing."""
    spec_file, weights = config.model_dir / "model.json", config.model_dir / "model.pt"
    if not spec_file.exists() or not weights.exists():
        raise DataError(config.model_dir, "no trained networks here (model.json and model.pt): run the train stage first")
    try:
        trained = json.loads(spec_file.read_text())
    except json.JSONDecodeError:
        raise DataError(spec_file, "not valid JSON: run the train stage again") from None
    missing = [key for key in ("run_id", "data_hash") if key not in trained]
    if missing:
        raise DataError(spec_file, f"no {' or '.join(missing)}: not written by the train stage")
    return trained, Classifier.load(config.model_dir)


def run(config: CalibrateConfig) -> dict:
    import torch

    from components.stage import file_hash

    if not config.split.exists():
        raise DataError(config.split, "split not found: run the split stage first")
    trained, classifier = trained_networks(config)
    if file_hash(config.split) != trained["data_hash"]:  # its val rows could be images the networks trained on
        raise DataError(config.split, f"not the split the networks in {config.model_dir} were trained on: run the train stage first")
    split = pd.read_csv(config.split)
    validation = split[split["split"] == "val"]
    if validation.empty:
        raise DataError(config.split, "no validation rows to calibrate on")
    torch.set_num_threads(config.threads)
    calibration = fit_on_validation(classifier, validation, config)
    published = _publish(classifier, config, trained, calibration)
    print(
        f"temperature {calibration['calibration_temperature']:.2f} (val ECE {calibration['val_ece_uncalibrated']:.3f} -> "
        f"{calibration['val_ece_calibrated']:.3f}), operating threshold {calibration['operating_threshold']:.3f} (validation "
        f"sensitivity {calibration.get('val_sensitivity_at_threshold', float('nan')):.3f}, specificity "
        f"{calibration.get('val_specificity_at_threshold', float('nan')):.3f}); MLflow run {published['run_id']} "
        f"(networks from training run {trained['run_id']})",
        flush=True,
    )
    return published


def _publish(classifier: Classifier, config: CalibrateConfig, trained: dict, calibration: dict[str, float]) -> dict:
    """The calibration's MLflow run (networks, spec, params, figures) and ``out_dir`` for the later stages."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(get_settings().tracking_uri)
    try:
        training = client.get_run(trained["run_id"])
    except MlflowException:
        raise DataError(
            config.model_dir / "model.json", f"its training run {trained['run_id']} is not in the tracking store: run the train stage again"
        ) from None
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    run_name = f"calibrate-{classifier.spec.network}-{classifier.spec.image_size}px"
    started_from = {key: value for key, value in training.data.tags.items() if key in STARTING_POINT_TAGS}  # the card names them
    tags = {TRAINED_RUN_TAG: trained["run_id"], **started_from}
    with mlflow.start_run(experiment_id=training.info.experiment_id, run_name=run_name, tags=tags) as run:
        own = config.model_dump(mode="json", exclude={"model_dir", "split", "out_dir", "threads"})
        mlflow.log_params({**training.data.params, **{key: str(value) for key, value in own.items()}})
        info = mlflow.pytorch.log_model(classifier.net, name="model", serialization_format="pickle", pip_requirements=MLFLOW_REQUIREMENTS)
        mlflow.log_dict(classifier.spec.model_dump(), "tumorscope/model.json")
        mlflow.log_dict(classifier.projection.model_dump(), "tumorscope/embedding.json")
        mlflow.log_metrics(calibration)
    identity = {
        "run_id": run.info.run_id,
        "trained_run_id": trained["run_id"],
        "mlflow_model_uri": info.model_uri,
        "data_hash": trained["data_hash"],
    }
    classifier.save(config.out_dir, identity)
    return identity


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().calibrate))


if __name__ == "__main__":
    main()
