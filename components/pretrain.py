"""The pretrain stage: the train stage's network first learns another labelled set of brain MRI, and training
starts from those weights.

No pretrained weights can be downloaded here, and 40 patients (LGG) are few to learn what a brain looks like. Another
public set of other patients (Masoud's 5,708 slices of four classes) is. Its images that copy one of the
pipeline's own images are left out first: otherwise the test split's slices could reach the network through its
starting weights. A copy is found as ingest finds near-duplicates, by the correlation of thumbnails, here between
every pretraining image and each sequence (and the mean) of every target image.

The network is the train section's own (so every tensor but the last layer's loads), trained on the pretraining
set's classes without what is specific to the target set: no lesion map (no masks), no mixup, sequence dropout or
intensity jitter. With ``pretrain.source`` unset, the stage records that nothing was pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import IngestConfig, PretrainConfig, TrainConfig, load_params
from components.errors import DataError

SUMMARY_FILE = "pretrain.json"
WEIGHTS_FILE = "model.pt"
# What pretraining takes from the train section: the network's shape (so its weights load) and how it is optimised
# (dvc.yaml lists these as the stage's params), and how the machine runs it. Everything specific to the target set
# (lesion map, mixup, sequence dropout, intensity jitter, ensembles, starting weights) keeps TrainConfig's default: off.
FROM_TRAIN = ("network", "image_size", "in_channels", "channels", "blocks", "norm", "batch_size", "weight_decay",
              "label_smoothing", "augment", "precision", "experiment")  # fmt: skip
RUNTIME = ("threads", "resume", "checkpoint_root")


def pretraining_config(config: PretrainConfig, train: TrainConfig) -> TrainConfig:
    """The train section's network, trained on the pretraining set with the pretraining schedule and seed; on one
    device (DDP ranks would each redo the ingest and the copy check)."""
    taken = {key: getattr(train, key) for key in (*FROM_TRAIN, *RUNTIME)} | {"experiment": f"{train.experiment}-pretrain"}
    return TrainConfig(
        **taken,
        split=config.data_dir / "split.csv",
        out_dir=config.out_dir,
        epochs=config.epochs,
        max_minutes=config.max_minutes,
        patience=config.epochs,  # one-cycle schedule: no early stop before the low learning rate
        learning_rate=config.learning_rate,
        seed=config.seed,
    )


def thumbnails_of(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every view's thumbnail (components.dedup.views) and the manifest row it is of."""
    from components.dedup import views
    from components.imaging import read_slice

    kept, owner = [], []
    for row, (path, name) in enumerate(zip(manifest["path"], manifest["image_id"])):
        seen = views(read_slice(path, name=name, color=True))
        kept += seen
        owner += [row] * len(seen)
    return np.stack(kept) if kept else np.zeros((0, 1024), np.float32), np.array(owner, dtype=int)


def copies_of_target(pretraining: pd.DataFrame, target: pd.DataFrame) -> np.ndarray:
    """Per pretraining image, its highest correlation with any view of any target image (-1: a blank image)."""
    from components.dedup import closest_matches

    target_views, _ = thumbnails_of(target)
    own_views, owner = thumbnails_of(pretraining)
    best = np.full(len(pretraining), -1.0)
    if len(target_views) and len(own_views):
        per_image, _ = closest_matches(target_views, own_views, owner)
        best[: len(per_image)] = per_image
    return best


def ingest_source(config: PretrainConfig, duplicate_correlation: float) -> pd.DataFrame:
    from components.ingest import run as ingest

    if not config.source.exists():
        raise DataError(config.source, "pretrain.source not found")
    ingest_config = IngestConfig(
        source=config.source, out=config.data_dir / "manifest.csv", derived_dir=config.data_dir / "derived",
        duplicate_correlation=duplicate_correlation, cache_dir=Path("data/cache"),
    )  # fmt: skip
    return ingest(ingest_config).manifest


def split_for_pretraining(manifest: pd.DataFrame, config: PretrainConfig) -> pd.DataFrame:
    """Train and val, near-duplicate groups whole: the validation figures the run logs are of unseen images."""
    from components.split import hold_out, leakage_groups

    held = hold_out(manifest["label"].to_numpy(), leakage_groups(manifest), config.val_fraction, config.seed)
    return manifest.assign(split=np.where(held, "val", "train"))


def run(config: PretrainConfig, train: TrainConfig, duplicate_correlation: float = 0.97) -> dict:
    from components import train as training

    config.out_dir.mkdir(parents=True, exist_ok=True)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    if config.source is None:
        return _summarise(config, {"pretrained": False})
    if not config.target.exists():
        raise DataError(config.target, "the pipeline's own manifest is missing: run the ingest stage first")
    manifest = ingest_source(config, duplicate_correlation)
    closest = copies_of_target(manifest, pd.read_csv(config.target))
    copies = closest >= config.copy_correlation
    kept = manifest[~copies].reset_index(drop=True)
    if kept["label"].nunique() < 2:
        raise DataError(config.source, f"fewer than two classes left to pretrain on after leaving out {int(copies.sum())} copies")
    print(
        f"pretraining set: {len(manifest)} images; {int(copies.sum())} left out as copies of the pipeline's own images "
        f"(thumbnail correlation >= {config.copy_correlation}; the highest of the rest {closest[~copies].max():.3f})",
        flush=True,
    )
    split = split_for_pretraining(kept, config)
    split.to_csv(config.data_dir / "split.csv", index=False)
    published = training.run(pretraining_config(config, train))
    accuracy = validation_accuracy(config.out_dir, split[split["split"] == "val"])
    print(f"pretrained on {len(kept)} images of {kept['label'].nunique()} classes: validation accuracy {accuracy:.3f}", flush=True)
    return _summarise(config, {
        "pretrained": True, "images": len(kept), "left_out_as_copies": int(copies.sum()),
        "highest_correlation_kept": round(float(closest[~copies].max()), 4), "classes": sorted(kept["label"].unique()),
        "validation_accuracy": round(accuracy, 4), "run_id": published["run_id"],
    })  # fmt: skip


def validation_accuracy(folder: Path, validation: pd.DataFrame) -> float:
    from components.imaging import read_slice
    from components.model import Classifier

    classifier = Classifier.load(folder)
    images = [read_slice(path, name=name, color=True) for path, name in zip(validation["path"], validation["image_id"])]
    predicted = np.array(classifier.spec.classes)[classifier.predict_proba(images).argmax(axis=1)]
    return float((predicted == validation["label"].to_numpy()).mean())


def _summarise(config: PretrainConfig, summary: dict) -> dict:
    (config.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if not summary["pretrained"]:
        print("pretrain.source not set: training starts from fresh weights", flush=True)
    return summary


def main() -> None:
    from components.stage import run_stage

    def work() -> dict:
        params = load_params()
        return run(params.pretrain, params.train, params.ingest.duplicate_correlation)

    run_stage(work)


if __name__ == "__main__":
    main()
