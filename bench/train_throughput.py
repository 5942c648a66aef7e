"""Benchmark of the train stage's machinery against a bare PyTorch loop, side by side in one run.

The same network (params.yaml `train`: MONAI ResNet), the same prepared images, the same batch size, the
same optimiser and loss: once in a plain `for` loop (forward, backward, AdamW step), once through the train
stage's own Lightning module, data module (MONAI augmentations off in both) and an MLflow logger writing to a
real SQLite store. Prints training images/s of both, their ratio (goal ≥ 0.9×) and the peak RSS of each.

    .venv/bin/python bench/train_throughput.py [--images 512] [--size 112] [--epochs 2]
    .venv/bin/python bench/train_throughput.py --data ../shared/data/masoud-224/Training --size 224   # real slices
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def frame_of(data: Path | None, images: int, folder: Path) -> pd.DataFrame:
    """Rows like the split's: a real class-folder data set, or a synthetic cohort made here."""
    if data is None:
        from components.config import SynthConfig
        from components.synth import run as synthesise

        synthesise(SynthConfig(out=folder / "synth", subjects=max(4, images // 2), slices_per_subject=2, image_size=128, seed=0))
        data = folder / "synth"
    paths = sorted(p for p in data.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.parent.name != "masks")
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:images]]
    return pd.DataFrame({"image_id": [f"im{i}" for i in range(len(paths))], "path": [str(p) for p in paths],
                         "label": [p.parent.name for p in paths], "split": "train"})  # fmt: skip


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bare_loop(config, images: np.ndarray, labels: np.ndarray, classes: list[str], epochs: int) -> float:
    """Images/s of a plain PyTorch loop over the same network, batches and optimiser."""
    import torch

    from components.model import build_network
    from components.train import model_spec

    torch.manual_seed(0)
    net = build_network(model_spec(config, classes)).to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)

    bf16 = config.precision == "bf16-mixed"

    def step(batch) -> None:
        optimiser.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x_all[batch].contiguous(memory_format=torch.channels_last)), y_all[batch])
        loss.backward()
        optimiser.step()

    for _ in range(3):  # warm-up, untimed, as Lightning's first epoch is
        step(torch.arange(config.batch_size))
    seen, started = 0, time.perf_counter()
    for _ in range(epochs - 1 if epochs > 1 else 1):
        order = torch.randperm(len(x_all))
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            batch = order[start : start + config.batch_size]
            step(batch)
            seen += len(batch)
    return seen / (time.perf_counter() - started)


def lightning_stage(config, frame: pd.DataFrame, classes: list[str], epochs: int, tracking: str) -> float:
    """Images/s of the train stage's Lightning module and data module, logging to a real MLflow store."""
    import lightning as L
    import mlflow
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import MLFlowLogger

    from components.train import class_weights, data_module, lightning_module, model_spec, quiet_lightning, trainer_precision

    quiet_lightning()
    L.seed_everything(0, verbose=False)
    timing = {"seen": 0, "seconds": 0.0}

    class Throughput(Callback):
        """Times the training batches of every epoch but the first (the warm-up), validation excluded."""

        def counted(self, trainer) -> bool:
            return trainer.current_epoch > 0 or epochs == 1

        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
            timing["seen"] += len(batch[1]) if self.counted(trainer) else 0

        def on_train_epoch_end(self, trainer, module) -> None:
            timing["seconds"] += time.perf_counter() - self.started if self.counted(trainer) else 0.0

    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run() as run:
        logger = MLFlowLogger(tracking_uri=tracking, run_id=run.info.run_id)
        module = lightning_module(model_spec(config, classes), config, class_weights(frame["label"], classes))
        trainer = L.Trainer(max_epochs=epochs, logger=logger, precision=trainer_precision(config), enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Throughput()], limit_val_batches=1, num_sanity_val_steps=0,
                            log_every_n_steps=50)  # fmt: skip
        validation = frame.head(config.batch_size).assign(split="val")
        trainer.fit(module, datamodule=data_module(pd.concat([frame, validation]), config, classes))
    return timing["seen"] / timing["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a class-folder data set (default: a synthetic cohort)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=None, help="input size (default: train.image_size)")
    parser.add_argument("--preset", default=None, help="a data set's settings (params/<name>.yaml), e.g. masoud")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up for both")
    args = parser.parse_args()
    import torch

    from components.config import params_with_preset
    from components.dataset import prepared_images

    config = params_with_preset(args.preset, PROJECT / "params.yaml").train.model_copy(update={"augment": False})
    if args.size:
        config = config.model_copy(update={"image_size": args.size})
    torch.set_num_threads(config.threads)
    folder = Path(tempfile.mkdtemp(prefix="tumorscope-train-bench-"))
    data = args.data.resolve() if args.data else None
    os.chdir(folder)  # the prepared-image cache and MLflow store live here
    frame = frame_of(data, args.images, folder)
    classes = sorted(frame["label"].unique())
    images = prepared_images(frame, config.image_size, channels=config.in_channels)
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    print(
        f"{len(frame)} images at {config.image_size} px, batch {config.batch_size}, {config.network} {config.channels}, {args.epochs} epochs"
    )
    bare = bare_loop(config, images, labels, classes, args.epochs)
    bare_peak = peak_rss_gb()
    print(f"bare PyTorch loop:                    {bare:7.1f} images/s   (peak RSS so far {bare_peak:.2f} GB)")
    staged = lightning_stage(config, frame, classes, args.epochs, f"sqlite:///{folder / 'mlflow.db'}")
    print(f"train stage (Lightning+MONAI+MLflow): {staged:7.1f} images/s   (peak RSS {peak_rss_gb():.2f} GB)")
    print(f"ratio: {staged / bare:.2f}x the bare loop (goal >= 0.9x)")


if __name__ == "__main__":
    main()
