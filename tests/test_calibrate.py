"""The calibrate stage: how the trained networks answer, fitted on validation without training them again."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from components.calibrate import choose_operating_threshold
from components.config import CalibrateConfig, load_params
from components.errors import DataError, TumorScopeError
from tests.conftest import PROJECT


def test_the_specificity_floor_raises_a_threshold_the_sensitivity_target_set_on_one_hard_tumour():
    rng = np.random.default_rng(3)
    negatives, tumours = rng.beta(1, 8, 200), np.r_[rng.beta(8, 1, 19), 0.02]  # one tumour slice scores like the negatives
    score, is_tumour = np.r_[negatives, tumours], np.r_[np.zeros(200, bool), np.ones(20, bool)]
    for_sensitivity = choose_operating_threshold(score, is_tumour, CalibrateConfig(target_sensitivity=0.95))["operating_threshold"]
    with_floor = choose_operating_threshold(score, is_tumour, CalibrateConfig(target_sensitivity=0.95, specificity_floor=0.9))
    assert for_sensitivity == pytest.approx(0.02), "20 tumours: the Wilson bound misses none, so the hardest sets it"
    assert with_floor["threshold_for_target_sensitivity"] == for_sensitivity < with_floor["operating_threshold"]
    assert with_floor["val_specificity_at_threshold"] >= 0.9 > (negatives < for_sensitivity).mean()
    assert with_floor["val_sensitivity_at_threshold"] == pytest.approx(19 / 20), "the hard tumour is given up, in the open"
    assert choose_operating_threshold(score, is_tumour, CalibrateConfig(specificity_floor=0.9))["operating_threshold"] == 0.5, "only raises"
    only_negatives = choose_operating_threshold(negatives, np.zeros(200, bool), CalibrateConfig(target_sensitivity=0.95))
    assert "val_sensitivity_at_threshold" not in only_negatives, "undefined, so left out rather than NaN"


@pytest.mark.parametrize("key, value", [("specificity_floor", "0.9"), ("flip_averaging", "True"), ("lesion_vote", "True")])
def test_an_old_params_file_with_how_the_networks_answer_under_train_says_where_it_moved(tmp_path, key, value):
    params = tmp_path / "params.yaml"
    shutil.copy(PROJECT / "params.yaml", params)
    params.write_text(
        params.read_text().replace(
            "  threads: 2\n  seed: 42\n  experiment: tumorscope\n",
            f"  threads: 2\n  seed: 42\n  experiment: tumorscope\n  {key}: {value.lower()}\n",
            1,
        )
    )
    with pytest.raises(TumorScopeError, match=rf"train\.{key} = {value}: .* \(it moved to calibrate\.{key}\)"):
        load_params(params)


def test_calibrating_before_training_names_the_missing_networks(tmp_path):
    from components.calibrate import run

    (tmp_path / "split.csv").write_text("image_id,label,split\n")
    with pytest.raises(DataError, match=r"models: no trained networks here \(model.json and model.pt\): run the train stage first"):
        run(CalibrateConfig(model_dir=tmp_path / "models", split=tmp_path / "split.csv"))


def _trained(folder, data_hash: str = "d1") -> None:
    """What the train stage leaves: a tiny network, its spec, its run id and data hash, marked uncalibrated."""
    from components.model import Classifier, ModelSpec, build_network

    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 8, 8], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    Classifier(spec, build_network(spec)).save(folder, {"run_id": "r1", "data_hash": data_hash, "calibrated": False})


def test_networks_trained_on_another_split_are_not_calibrated_on_this_one(tmp_path):
    from components.calibrate import run
    from components.stage import file_hash

    split = tmp_path / "split.csv"
    split.write_text("image_id,label,split\nim1,tumor,val\n")
    _trained(tmp_path / "models", data_hash=file_hash(split))
    split.write_text("image_id,label,split\nim1,tumor,train\nim2,notumor,val\n")  # re-split: im1 trained, now it would validate
    with pytest.raises(DataError, match="not the split the networks in .* were trained on"):
        run(CalibrateConfig(model_dir=tmp_path / "models", split=split))


def test_a_damaged_train_output_is_named_not_a_traceback(tmp_path):
    from components.calibrate import trained_networks

    _trained(tmp_path / "models")
    spec_file = tmp_path / "models" / "model.json"
    spec_file.write_text(spec_file.read_text().replace('"run_id"', '"run"'))
    with pytest.raises(DataError, match="no run_id: not written by the train stage"):
        trained_networks(CalibrateConfig(model_dir=tmp_path / "models"))
    spec_file.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        trained_networks(CalibrateConfig(model_dir=tmp_path / "models"))


def test_evaluating_or_predicting_with_the_uncalibrated_networks_is_refused(tmp_path):
    from components.batch import load_classifier

    params = tmp_path / "params.yaml"
    shutil.copy(PROJECT / "params.yaml", params)
    params.write_text(params.read_text().replace("model_dir: models_calibrated", "model_dir: models"))
    with pytest.raises(TumorScopeError, match="evaluate.model_dir is train.out_dir"):
        load_params(params)
    _trained(tmp_path / "models")
    with pytest.raises(TumorScopeError, match="not yet calibrated"):
        load_classifier(str(tmp_path / "models"))
