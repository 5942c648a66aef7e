"""The pretrain_set and pretrain stages: another set's images, less their copies of the pipeline's own, train the
network that the train stage starts from."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.config import Params, PretrainConfig, TrainConfig
from tests.conftest import PROJECT, make_workspace, training_runs, workspace_env


def test_without_a_pretraining_set_the_stages_record_that_and_training_starts_fresh(tmp_path, capsys):
    from components import pretrain, pretrain_set

    config = PretrainConfig(out_dir=tmp_path / "models_pretrained", data_dir=tmp_path / "pretrain")
    assert pretrain_set.run(config) == {"images": 0} and pd.read_csv(config.data_dir / "split.csv").empty
    (config.out_dir).mkdir()
    (config.out_dir / "model.pt").write_bytes(b"left by an earlier pretraining")
    assert pretrain.run(config, TrainConfig()) == {"pretrained": False}
    assert not (config.out_dir / "model.pt").exists(), "stale weights would start training"
    assert json.loads((config.out_dir / "pretrain.json").read_text()) == {"pretrained": False}
    assert "training starts from fresh weights" in capsys.readouterr().out
    assert Params().train_as_run.init_weights is None


def test_a_pretraining_set_makes_training_start_from_its_weights_and_init_weights_too_is_refused():
    params = Params.model_validate({"pretrain": {"source": "other-set", "out_dir": "pre"}})
    assert str(params.train_as_run.init_weights) == "pre/model.pt" and params.train.init_weights is None
    with pytest.raises(ValueError, match="pretrain.source and train.init_weights both name where training starts"):
        Params.model_validate({"pretrain": {"source": "other-set"}, "train": {"init_weights": "mine.pt"}})


def test_dvc_reruns_pretraining_for_exactly_the_keys_it_takes_and_not_for_new_target_images():
    from components.pretrain import FROM_PRETRAIN, FROM_TRAIN

    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    keys = stages["pretrain"]["params"]
    assert sorted(key.removeprefix("train.") for key in keys if key.startswith("train.")) == sorted(FROM_TRAIN)
    assert {f"pretrain.{key}" for key in FROM_PRETRAIN} <= set(keys) and "train.batch_size" not in keys, "tuning train does not pretrain"
    assert "${pretrain.target}" in stages["pretrain_set"]["deps"] and "${pretrain.target}" not in stages["pretrain"]["deps"]
    assert "${pretrain.out_dir}" in stages["train"]["deps"]


def test_the_pretraining_source_is_read_with_the_pipelines_ingest_settings_and_cache():
    from components.config import IngestConfig
    from components.pretrain_set import pretraining_ingest

    pipeline = IngestConfig.model_validate(
        {"format": "lgg", "feedback_dir": "data/feedback", "duplicate_correlation": 0.95, "volume": {"spacing": [2, 2, 2]}}
    )
    config = PretrainConfig(source="other-set", data_dir="data/pretrain")
    ingest = pretraining_ingest(config, pipeline)
    assert ingest.volume.spacing == (2, 2, 2) and ingest.duplicate_correlation == 0.95
    assert (str(ingest.source), ingest.format, ingest.feedback_dir) == ("other-set", "auto", None), "its own layout, no feedback"
    assert str(ingest.out) == "data/pretrain/manifest.csv" and str(ingest.cache_dir) == "data/cache", (
        "the cache is kept out of the stage's output"
    )
    assert "ingest.volume" in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["pretrain_set"]["params"]


def _save(image: np.ndarray, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).astype(np.uint8)).save(path)
    return str(path)


def test_a_copy_of_a_target_image_is_found_through_one_sequence_even_rescaled(tmp_path):
    from components.pretrain_set import copies_of_target

    rng = np.random.default_rng(0)
    colour = rng.random((48, 48, 3))
    target = pd.DataFrame({"path": [_save(colour, tmp_path / "target" / "a.png")], "image_id": ["img-1"]})
    own = [colour[..., 1] * 0.5 + 0.2, rng.random((48, 48)), np.zeros((48, 48))]  # FLAIR re-saved darker; unrelated; blank
    pretraining = pd.DataFrame(
        {"path": [_save(image, tmp_path / "own" / f"{k}.png") for k, image in enumerate(own)], "image_id": ["p0", "p1", "p2"]}
    )
    closest = copies_of_target(pretraining, target)
    assert closest[0] > 0.97 and closest[1] < 0.5 and closest[2] == -1.0


@pytest.mark.slow
def test_the_stage_pretrains_on_another_set_less_its_copies_and_train_starts_from_it(tmp_path):
    rng = np.random.default_rng(1)
    source = tmp_path / "other-set"
    for k in range(24):  # two classes another set could have: a bright disc or not
        image = rng.random((64, 64)) * 0.3
        if k % 2:
            yy, xx = np.mgrid[:64, :64]
            image[(yy - 20 - k) ** 2 + (xx - 30) ** 2 < 80] = 1.0
        _save(image, source / ("disc" if k % 2 else "plain") / f"{k}.png")
    train = {"image_size": 32, "epochs": 1, "channels": [8, 8, 8, 8], "mask_weight": 0.0}
    pretrain = {"source": str(source), "epochs": 2, "val_fraction": 0.25}
    root = make_workspace(tmp_path / "ws", {"synth": {"subjects": 16, "image_size": 64}, "train": train, "pretrain": pretrain})
    env = workspace_env(root)

    def stage(name: str) -> str:
        done = subprocess.run([sys.executable, "-m", f"components.{name}"], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    for name in ("synth", "ingest"):
        stage(name)
    target = pd.read_csv(root / "data" / "manifest.csv")
    copied = np.asarray(Image.open(root / target["path"].iloc[0]))  # one of the pipeline's own slices, in the other set
    Image.fromarray(copied).save(source / "plain" / "copy.png")
    for name in ("validate", "split"):
        stage(name)
    output = stage("pretrain_set") + stage("pretrain")
    summary = json.loads((root / "models_pretrained" / "pretrain.json").read_text())
    assert summary["pretrained"] and summary["images"] == 24 and summary["left_out_as_copies"] == 1, output
    assert summary["classes"] == ["disc", "plain"] and 0 <= summary["validation_accuracy"] <= 1
    client, runs = training_runs(root, "tumorscope-pretrain")
    assert [run.info.run_id for run in runs] == [summary["run_id"]] and runs[0].info.status == "FINISHED"
    output = stage("train")
    assert "initial weights: " in output and "tensors from model.pt" in output
    stage("calibrate")
    runs = training_runs(root)[1]  # the training run, and the calibration run that a registry version would be
    assert [run.data.tags.get("tumorscope.pretrained_run") for run in runs] == [summary["run_id"]] * 2, "the model names its pretraining"
