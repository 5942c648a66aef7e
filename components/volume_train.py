"""Train volumes: a MONAI 3D CNN on the preprocessed volumes that ingest lists in ``volumes.csv``.

A volume's label (a class folder, ``labels.csv``) says nothing about which slice shows the tumour, and a
slice loses how a lesion extends through its neighbours; a 3D network learns from the whole volume.

The default synthetic cohort has no volumes, and a handful of real ones cannot be split into train and
test: below ``min_volumes`` labelled volumes, or when a class has too few subjects for both sides of the
split, the stage writes a 'skipped' result and goes on (without importing torch), not an error.

Volumes are split by subject and stratified by label; the test volumes never train. There is no
validation split and no early stopping: cohorts of volumes are small, so every train volume trains, for a
fixed number of epochs under a one-cycle schedule, and the last weights are the model. Outputs:
``out_dir/model.pt`` + ``model.json`` (spec) + ``split.csv``, ``report_dir/metrics.json`` +
``predictions.csv``, and one MLflow run in ``experiment``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from components.config import NO_TUMOUR, VolumeTrainConfig, load_params
from components.errors import DataError
from components.imaging import code_version, file_signature

WEIGHTS_FILE, SPEC_FILE, SPLIT_FILE, SKIPPED_FILE = "model.pt", "model.json", "split.csv", "skipped.json"
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.csv"
REQUIRED_COLUMNS = ("volume_id", "subject", "label", "path")
INTENSITY_JITTER = 0.1  # ± per sequence, in units of the in-brain standard deviation (volumes are z-scored)


class TooFewVolumes(Exception):
    """The data cannot train and test a 3D model: reported as 'skipped', never as a failed stage."""


class VolumeModelSpec(BaseModel):
    network: str
    spatial_size: int
    channels: list[int]
    blocks: list[int]
    classes: list[str]
    in_channels: int
    sequences: str = ""  # channel order the network expects, e.g. "flair+t1"


def build_volume_network(spec: VolumeModelSpec):
    """A MONAI 3D classifier trained from scratch (the 2D model's builder, in three dimensions)."""
    from components.model import monai_classifier

    return monai_classifier(spec.network, 3, spec.in_channels, len(spec.classes), spec.channels, spec.blocks)


def load_volume_model(folder: Path):
    """The saved spec and network, ready for inference."""
    import torch

    spec = VolumeModelSpec.model_validate_json((folder / SPEC_FILE).read_text())
    net = build_volume_network(spec)
    net.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return spec, net.eval()


# ---------------------------------------------------------------- which volumes, which split


def labelled_volumes(config: VolumeTrainConfig) -> pd.DataFrame:
    """The rows with a label; raises TooFewVolumes when they cannot train and test a model."""
    if not config.volumes.exists():
        raise TooFewVolumes(f"no volumes table at {config.volumes}: the data source has no NIfTI/DICOM volumes")
    try:
        table = pd.read_csv(config.volumes, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame(columns=list(REQUIRED_COLUMNS))
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise DataError(config.volumes, f"missing columns {', '.join(missing)} (is this the ingest stage's volumes.csv?)")
    table["label"] = table["label"].str.strip()
    table["subject"] = table["subject"].where(table["subject"].str.strip() != "", table["volume_id"])
    labelled = table[table["label"] != ""].reset_index(drop=True)
    if len(labelled) < config.min_volumes:
        raise TooFewVolumes(
            f"{len(labelled)} labelled volumes (of {len(table)}), fewer than train_volumes.min_volumes = {config.min_volumes}"
        )
    if labelled["label"].nunique() < 2:
        raise TooFewVolumes(f"every labelled volume is '{labelled['label'].iloc[0]}': a classifier needs two classes")
    return labelled


def split_by_subject(volumes: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """True for test volumes: one fold of a subject-grouped, label-stratified K-fold with K ≈ 1/test_fraction,
    so that every volume of a subject lands on the same side. Raises TooFewVolumes when the train side would
    miss a class (the network could never predict it)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    subjects = volumes["subject"].nunique()
    if subjects < 2:
        raise TooFewVolumes("all labelled volumes belong to one subject: no subject is left for a test set")
    folds = min(max(2, round(1 / test_fraction)), subjects)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")  # judged below, by what train keeps
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        _, test = next(splitter.split(volumes, volumes["label"], groups=volumes["subject"]))
    is_test = np.zeros(len(volumes), dtype=bool)
    is_test[test] = True
    absent = sorted(set(volumes["label"]) - set(volumes.loc[~is_test, "label"]))
    if absent:
        raise TooFewVolumes(f"class {', '.join(absent)} has too few subjects for both the train and the test volumes")
    return is_test


# ---------------------------------------------------------------- reading and preparing volumes


def read_volume(path: str | Path, volume_id: str) -> np.ndarray:
    """(C, X, Y, Z) float32 in RAS, from a NIfTI holding sequences on its 4th axis. Errors name the volume by
    its pseudonym, never by its path."""
    import nibabel as nib

    if not Path(path).exists():
        raise DataError(volume_id, "volume file not found: rerun the ingest stage")
    try:
        image = nib.as_closest_canonical(nib.load(path))  # a no-op for ingest's RAS output; guards other writers
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a broken file
        raise DataError(volume_id, f"not a readable NIfTI volume ({exc.__class__.__name__})") from None
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise DataError(volume_id, f"expected a 3D volume with sequences on a 4th axis, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(volume_id, "volume holds NaN or infinite values")
    return np.ascontiguousarray(np.moveaxis(data, -1, 0))


def resize_to_cube(volume: np.ndarray, size: int) -> np.ndarray:
    """Longest side to ``size``, the others zero-padded: a cube without distorting anatomy, and zero is the
    background of ingest's brain-masked, z-scored volumes. Shrinking averages voxel blocks ('area'), a box filter
    against aliasing 50x faster than MONAI's Gaussian anti-aliasing (1 s per sequence at 240³ → 64)."""
    from monai.transforms import Resize, SpatialPad

    mode = "area" if max(volume.shape[1:]) > size else "trilinear"
    resized = Resize(spatial_size=size, size_mode="longest", mode=mode)(volume)
    padded = SpatialPad(spatial_size=(size, size, size))(resized)
    return np.asarray(padded, dtype=np.float32)


def _cache_file(path: str, size: int, cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"{file_signature(path)}:{size}:{code_version('components.volume_train')}".encode())
    return cache_dir / "volumes3d" / f"{key.hexdigest()[:20]}.npy"


def prepared_volume(volume_id: str, path: str, size: int, cache_dir: Path | None) -> np.ndarray:
    """One volume as model input, from the disk cache when the file, the size and this code are unchanged:
    reading and resizing full volumes is what makes a rerun with other training params slow."""
    cache = _cache_file(path, size, cache_dir)
    if cache is not None and cache.exists():
        return np.load(cache)
    array = resize_to_cube(read_volume(path, volume_id), size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, array)
    return array


def prepared_volumes(volumes: pd.DataFrame, size: int, cache_dir: Path | None) -> np.ndarray:
    """(N, C, S, S, S) float32, held in memory for the whole run (volumes are small once resized)."""
    from components.stage import track

    rows = zip(volumes["volume_id"], volumes["path"])
    arrays = [
        prepared_volume(vid, path, size, cache_dir) for vid, path in track(rows, sys.stdout.isatty(), "preparing volumes", len(volumes))
    ]
    expected = arrays[0].shape[0]
    for volume_id, array in zip(volumes["volume_id"], arrays):
        if array.shape[0] != expected:
            raise DataError(
                volume_id, f"has {array.shape[0]} sequences where others have {expected}: train on volumes with the same sequences"
            )
    return np.stack(arrays)


def augment_volumes(batch):
    """Left-right mirror (axis 0 is left-right in RAS; tumours occur on either side) and a small gain and
    offset per sequence inside the brain (scanners differ), for a whole (N, C, X, Y, Z) batch at once."""
    import torch

    n, channels = batch.shape[:2]
    flip = (torch.rand(n, device=batch.device) < 0.5).view(n, 1, 1, 1, 1)
    out = torch.where(flip, batch.flip(2), batch)
    jitter = lambda: (torch.rand(n, channels, 1, 1, 1, device=batch.device) * 2 - 1) * INTENSITY_JITTER  # noqa: E731
    brain = out != 0
    return torch.where(brain, out * (1 + jitter()) + jitter(), out)


# ---------------------------------------------------------------- training


def _lightning_module(spec: VolumeModelSpec, config: VolumeTrainConfig, weights: np.ndarray):
    import lightning as L
    import torch

    class VolumeClassifier(L.LightningModule):
        """Class-weighted cross-entropy, AdamW under a one-cycle schedule; one printed line per epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.net = build_volume_network(spec)
            self.loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
            self._epoch: list[tuple[float, float, int]] = []

        def forward(self, x):
            return self.net(x)

        def on_after_batch_transfer(self, batch, _):
            return (augment_volumes(batch[0]), batch[1]) if self.trainer.training else batch

        def training_step(self, batch, _):
            x, y = batch
            logits = self(x)
            loss = self.loss(logits, y)
            accuracy = (logits.argmax(1) == y).float().mean()
            self.log_dict({"train_loss": loss, "train_accuracy": accuracy}, on_step=False, on_epoch=True, batch_size=len(y))
            self._epoch.append((float(loss.detach()), float(accuracy), len(y)))
            return loss

        def on_train_epoch_end(self):
            """Lightning's own epoch aggregates land after this hook: the printed line uses ours."""
            losses, accuracies, sizes = (np.asarray(v, dtype=float) for v in zip(*self._epoch))
            self._epoch.clear()
            loss, accuracy = np.average(losses, weights=sizes), np.average(accuracies, weights=sizes)
            print(
                f"epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: train_loss {loss:.4f}, train_accuracy {accuracy:.3f}",
                flush=True,
            )

        def configure_optimizers(self):
            from components.train import one_cycle

            return one_cycle(self, config.learning_rate, config.weight_decay)

    return VolumeClassifier()


def _train_loader(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Shuffled; a last batch of one volume is dropped (batch norm cannot train on it)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=len(dataset) % batch_size == 1)


def _trainer(config: VolumeTrainConfig, logger):
    import logging
    import warnings

    import lightning as L
    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|litlogger|logging interval).*")
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator="auto",
        devices=1,
        precision="16-mixed" if torch.cuda.is_available() else "32-true",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=sys.stdout.isatty(),
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def predict_volumes(net, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, on the CPU in eval mode."""
    import torch

    net = net.cpu().eval()
    with torch.inference_mode():
        parts = [torch.softmax(net(torch.from_numpy(images[i : i + batch_size])), 1) for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy()


def volume_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy of the most probable class, plus tumour-vs-no-tumour metrics at P(tumour) ≥ 0.5 where the
    classes include the no-tumour class (the same code that scores the 2D model)."""
    from components.evaluate import binary_metrics

    metrics = {"accuracy": float((np.asarray(classes)[probabilities.argmax(1)] == labels).mean())}
    if NO_TUMOUR in classes:
        metrics |= binary_metrics(labels != NO_TUMOUR, 1 - probabilities[:, classes.index(NO_TUMOUR)], 0.5)
    return metrics


def _data_hash(volumes: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for volume_id, label, path in zip(volumes["volume_id"], volumes["label"], volumes["path"]):
        digest.update(f"{volume_id}:{label}:{file_signature(path)}".encode())
    return digest.hexdigest()[:16]


def _start_mlflow_run(config: VolumeTrainConfig, spec: VolumeModelSpec, volumes: pd.DataFrame, is_test: np.ndarray):
    import mlflow

    from components.settings import use_experiment

    use_experiment(config.experiment)
    run = mlflow.start_run(run_name=f"volumes-{spec.network}-{spec.spatial_size}vox")
    params = config.model_dump(mode="json", exclude={"volumes", "out_dir", "report_dir", "cache_dir", "experiment"})
    mlflow.log_params(
        {**params, "classes": ",".join(spec.classes), "in_channels": spec.in_channels, "sequences": spec.sequences,
         "train_volumes": int((~is_test).sum()), "test_volumes": int(is_test.sum()), "data_hash": _data_hash(volumes)}
    )  # fmt: skip
    return run


def run(config: VolumeTrainConfig) -> dict:
    """Train and test a 3D network on the labelled volumes; a 'skipped' result when they are too few."""
    try:
        volumes = labelled_volumes(config)
        is_test = split_by_subject(volumes, config.test_fraction, config.seed)
    except TooFewVolumes as reason:
        return _skip(config, str(reason))
    return _train(config, volumes, is_test)


def _train(config: VolumeTrainConfig, volumes: pd.DataFrame, is_test: np.ndarray) -> dict:
    import lightning as L
    import mlflow
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    from components.settings import get_settings

    torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    classes = sorted(volumes["label"].unique())
    index = volumes["label"].map({label: i for i, label in enumerate(classes)}).to_numpy(dtype=np.int64)
    images = prepared_volumes(volumes, config.spatial_size, config.cache_dir)
    sequences = volumes["sequences"].iloc[0] if "sequences" in volumes else ""
    spec = VolumeModelSpec(network=config.network, spatial_size=config.spatial_size, channels=config.channels, blocks=config.blocks,
                           classes=classes, in_channels=images.shape[1], sequences=sequences)  # fmt: skip
    print(
        f"{len(volumes)} labelled volumes of {volumes['subject'].nunique()} subjects ({', '.join(classes)}): "
        f"{(~is_test).sum()} train, {is_test.sum()} test, grouped by subject",
        flush=True,
    )
    from components.train import class_weights

    module = _lightning_module(spec, config, class_weights(volumes.loc[~is_test, "label"], classes))
    with _start_mlflow_run(config, spec, volumes, is_test) as mlflow_run:
        run_id = mlflow_run.info.run_id
        trainer = _trainer(config, MLFlowLogger(tracking_uri=get_settings().tracking_uri, run_id=run_id))
        trainer.fit(module, train_dataloaders=_train_loader(images[~is_test], index[~is_test], config.batch_size))
        probabilities = predict_volumes(module.net, images[is_test], config.batch_size)
        metrics = volume_metrics(volumes.loc[is_test, "label"].to_numpy(), probabilities, classes)
        mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items() if math.isfinite(value)})
        _save_model(config.out_dir, module.net, spec, volumes, is_test, run_id)
        summary = _write_reports(config, volumes[is_test], probabilities, metrics, spec, run_id)
        mlflow.log_artifacts(str(config.out_dir), artifact_path="volume_model")
        mlflow.log_artifacts(str(config.report_dir), artifact_path="volume_reports")
    shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items() if math.isfinite(value))
    print(f"test volumes: {shown}; MLflow run {run_id}", flush=True)
    return summary


# ---------------------------------------------------------------- outputs


def _clear(folder: Path, names: tuple[str, ...]) -> None:
    """Remove this stage's own files left by an earlier run, so a skipped run never shows an old model."""
    for name in names:
        (folder / name).unlink(missing_ok=True)


def _skip(config: VolumeTrainConfig, reason: str) -> dict:
    result = {"skipped": reason}
    for folder in (config.out_dir, config.report_dir):
        folder.mkdir(parents=True, exist_ok=True)
    _clear(config.out_dir, (WEIGHTS_FILE, SPEC_FILE, SPLIT_FILE))
    (config.out_dir / SKIPPED_FILE).write_text(json.dumps(result, indent=2))
    (config.report_dir / METRICS_FILE).write_text(json.dumps(result, indent=2))
    pd.DataFrame(columns=["volume_id", "subject", "label", "predicted"]).to_csv(config.report_dir / PREDICTIONS_FILE, index=False)
    print(f"train_volumes skipped: {reason}", flush=True)
    return result


def _save_model(folder: Path, net, spec: VolumeModelSpec, volumes: pd.DataFrame, is_test: np.ndarray, run_id: str) -> None:
    """Weights, spec (with the run that made it) and which volumes trained: the model's provenance."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder, (SKIPPED_FILE,))
    torch.save(net.cpu().state_dict(), folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps({**spec.model_dump(), "run_id": run_id}, indent=2))
    split = volumes[["volume_id", "subject", "label"]].assign(part=np.where(is_test, "test", "train"))
    split.to_csv(folder / SPLIT_FILE, index=False)


def _write_reports(
    config: VolumeTrainConfig, test: pd.DataFrame, probabilities: np.ndarray, metrics: dict, spec: VolumeModelSpec, run_id: str
) -> dict:
    config.report_dir.mkdir(parents=True, exist_ok=True)
    predictions = test[["volume_id", "subject", "label"]].assign(predicted=np.asarray(spec.classes)[probabilities.argmax(1)])
    for i, name in enumerate(spec.classes):
        predictions[f"p_{name}"] = probabilities[:, i]
    predictions.to_csv(config.report_dir / PREDICTIONS_FILE, index=False)
    summary = {
        "network": spec.network,
        "classes": spec.classes,
        "test_volumes": len(test),
        "test_subjects": int(test["subject"].nunique()),
        **{name: value if math.isfinite(value) else None for name, value in metrics.items()},  # JSON has no NaN
        "run_id": run_id,
    }
    (config.report_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().train_volumes))


if __name__ == "__main__":
    main()
