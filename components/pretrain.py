"""The pretrain stage: the train stage's network first learns another labelled set of brain MRI, and training
starts from those weights.

No pretrained weights can be downloaded here, and 40 patients (LGG) are few to learn what a brain looks like. Another
public set of other patients (Masoud's 5,708 slices of four classes) is. The pretrain_set stage has already left out
its copies of the pipeline's own images and split it (components/pretrain_set.py).

The network is the train section's (so every tensor but the last layer's loads), trained on the pretraining set's
classes with the pretrain section's schedule, and without what is specific to the target set: no lesion map (no
masks), no mixup, sequence dropout or intensity jitter. With ``pretrain.source`` unset, the stage records that
nothing was pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import PretrainConfig, TrainConfig, load_params
from components.errors import DataError
from components.model import WEIGHTS_FILE
from components.pretrain_set import SELECTION_FILE

SUMMARY_FILE = "pretrain.json"
# What pretraining takes from the train section: the network's shape, so that its weights load (dvc.yaml lists these
# as the stage's params), and how the machine runs it. How it is optimised is the pretrain section's: tuning train's
# optimiser does not pretrain again. What is specific to the target set (lesion map, mixup, sequence dropout,
# intensity jitter, ensembles, starting weights) keeps TrainConfig's default: off.
FROM_TRAIN = ("network", "image_size", "in_channels", "channels", "blocks", "norm", "experiment")
RUNTIME = ("threads", "resume", "checkpoint_root", "precision")
FROM_PRETRAIN = ("epochs", "max_minutes", "batch_size", "learning_rate", "weight_decay", "label_smoothing", "augment", "seed")


def pretraining_config(config: PretrainConfig, train: TrainConfig) -> TrainConfig:
    """The train section's network, trained on the pretraining split with the pretrain section's schedule; on one
    device (DDP ranks would each read and check the set again)."""
    taken = {key: getattr(train, key) for key in (*FROM_TRAIN, *RUNTIME)} | {"experiment": f"{train.experiment}-pretrain"}
    return TrainConfig(
        **taken,
        **{key: getattr(config, key) for key in FROM_PRETRAIN},
        split=config.split_file,
        out_dir=config.out_dir,
        patience=config.epochs,  # one-cycle schedule: no early stop before the low learning rate
    )


def run(config: PretrainConfig, train: TrainConfig) -> dict:
    from components import train as training

    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    if config.source is None:
        print("pretrain.source not set: training starts from fresh weights", flush=True)
        return _summarise(config, {"pretrained": False})
    split_file = config.split_file
    if not split_file.exists():
        raise DataError(split_file, "no pretraining split: run the pretrain_set stage first")
    split = pd.read_csv(split_file)
    if split.empty:
        raise DataError(split_file, "no images to pretrain on: run the pretrain_set stage again (pretrain.source is set)")
    published = training.run(pretraining_config(config, train))
    accuracy = validation_accuracy(config.out_dir, split[split["split"] == "val"])
    print(f"pretrained on {len(split)} images of {split['label'].nunique()} classes: validation accuracy {accuracy:.3f}", flush=True)
    selection = json.loads((config.data_dir / SELECTION_FILE).read_text())
    return _summarise(config, {"pretrained": True, **selection, "validation_accuracy": round(accuracy, 4), "run_id": published["run_id"]})


def validation_accuracy(folder: Path, validation: pd.DataFrame) -> float:
    from components.imaging import read_slice
    from components.model import Classifier

    classifier = Classifier.load(folder)
    images = [read_slice(path, name=name, color=True) for path, name in zip(validation["path"], validation["image_id"])]
    predicted = np.array(classifier.spec.classes)[classifier.predict_proba(images).argmax(axis=1)]
    return float((predicted == validation["label"].to_numpy()).mean())


def _summarise(config: PretrainConfig, summary: dict) -> dict:
    (config.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    from components.stage import run_stage

    def work() -> dict:
        params = load_params()
        return run(params.pretrain, params.train)

    run_stage(work)


if __name__ == "__main__":
    main()
