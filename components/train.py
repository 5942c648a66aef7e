"""Train: Lightning fits a MONAI network on the train split, early-stopped on val.

One MLflow run per job (only global rank 0 creates and logs it, also under DDP):
params, the data hash and per-epoch metrics. With ``train.members`` > 1 the job trains that many
networks one after another and ships their ensemble (each network's metrics
under its own prefix; a killed job keeps the networks it finished). ``models/`` receives ``model.pt`` + ``model.json``
(the best weights and their spec) for the calibrate stage, which fits how they answer and logs them as a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

from components.config import NO_TUMOUR, TUMOUR, TUMOUR_TYPES, CalibrateConfig, TrainConfig, load_params
from components.errors import DataError, TumorScopeError
from components.model import Classifier, ModelSpec, build_network, one_network
from components.settings import get_settings, use_experiment
from components.stage import file_hash


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and os.environ.get("NODE_RANK", "0") == "0"


def lightning_module(spec: ModelSpec, config: TrainConfig, weights: np.ndarray, label: str = ""):
    import lightning as L
    import torch
    from sklearn.metrics import roc_auc_score

    class SliceClassifier(L.LightningModule):
        """Cross-entropy with class weights; val AUC on P(tumour), the score the gate uses."""

        def __init__(self) -> None:
            super().__init__()
            self.net = build_network(spec).to(memory_format=torch.channels_last)
            self.loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), label_smoothing=config.label_smoothing)
            self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
            self._train_losses: list[float] = []
            self.slower: frozenset[str] = frozenset()  # parameters loaded from starting weights (_fit_network)
            self._training_at = config.image_size  # the size training batches were last given (_training_size)

        def forward(self, x):
            return self.net(x.contiguous(memory_format=torch.channels_last))

        def on_after_batch_transfer(self, batch, _):
            from components.dataset import at_size, augment_batch, drop_sequences, jitter_intensities

            if not self.trainer.training:  # validation at the size the epoch trained at: see _val_key
                return at_size(batch[0], self._training_at), *batch[1:]
            images = at_size(batch[0], self._training_size())  # masks stay full size: the lesion loss pools them to its map
            if not config.augment:
                return images, *batch[1:]
            images = jitter_intensities(drop_sequences(images, config.sequence_dropout), config.intensity_jitter)
            if spec.lesion_head:
                images, masks = augment_batch(images, batch[2])
                return images, batch[1], masks, batch[3]
            return augment_batch(images), batch[1]

        def _training_size(self) -> int:
            """``early_image_size`` for the first ``early_share`` of training, as far as the schedule has gone (steps or
            the clock, whichever is further: ``budgeted_one_cycle``), then ``image_size``: early epochs cost about
            (early / full size)² as much, so a time budget holds more of them, and the network ends at the size it
            answers at."""
            size = config.image_size
            if config.early_image_size is not None and self.lr_schedulers().progress < config.early_share:
                size = min(config.early_image_size, config.image_size)  # tuning may set image_size below it
            if size != self._training_at and self.trainer.is_global_zero:
                print(f"{label}training batches at {size} px from step {self.trainer.global_step + 1}", flush=True)
            self._training_at = size
            return size

        def training_step(self, batch, _):
            x, y = batch[:2]
            weight, partner = 1.0, torch.arange(len(y), device=y.device)
            if config.mixup > 0:  # mixup (Zhang et al. 2018): blends of two slices, the loss blended alike
                weight = float(np.random.beta(config.mixup, config.mixup))
                partner = torch.randperm(len(y), device=y.device)
                x = weight * x + (1 - weight) * x[partner]
            if spec.lesion_head:
                from components.lesion_net import lesion_loss

                logits, lesion_map = self.net.classify(x.contiguous(memory_format=torch.channels_last))
                masks, has_mask = batch[2], batch[3]
                blended = weight * masks + (1 - weight) * masks[partner]
                mask_loss = lesion_loss(lesion_map, blended, has_mask & has_mask[partner])
                self.log("train_mask_loss", mask_loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
            else:
                logits, mask_loss = self(x), 0.0
            loss = self.loss(logits, y) if weight == 1.0 else weight * self.loss(logits, y) + (1 - weight) * self.loss(logits, y[partner])
            loss = loss + config.mask_weight * mask_loss
            self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
            self._train_losses.append(float(loss.detach()))
            return loss

        def _val_key(self, name: str) -> str:
            """``name``, or ``<name>_<size>px`` for an epoch validated below ``image_size``. Progressive resizing's
            early epochs validate at their training size (a network trained at 128 px scored 0.36-0.59 accuracy
            on Masoud at 224 px, where validating cost three times as much); only ``val_loss`` picks the epoch kept
            and stops training, so a network is never kept from an epoch it was not trained at full size."""
            return name if self._training_at == config.image_size else f"{name}_{self._training_at}px"

        def validation_step(self, batch, _):
            x, y = batch[:2]
            logits = self(x)
            self.log(self._val_key("val_loss"), self.loss(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
            self._val_outputs.append((torch.softmax(logits.float(), 1).detach(), y))  # bf16 has no numpy type

        def on_validation_epoch_end(self):
            probs, labels = self._gathered()
            self._val_outputs.clear()
            epoch = {self._val_key("val_accuracy"): float((probs.argmax(1) == labels).mean())}
            if NO_TUMOUR in spec.classes:  # a pretraining set may have none: no tumour-vs-none AUC then
                is_tumour = labels != spec.tumour_free_index
                if 0 < is_tumour.sum() < len(labels):
                    epoch[self._val_key("val_auc")] = float(roc_auc_score(is_tumour, 1 - probs[:, spec.tumour_free_index]))
            self.log_dict(epoch)  # already computed over every rank's predictions
            if not self.trainer.sanity_checking and self.trainer.is_global_zero:
                log_probs = torch.log(torch.from_numpy(probs).clamp_min(1e-7)).to(self.device)
                val_loss = float(self.loss(log_probs, torch.from_numpy(labels).to(self.device)))
                self._print_epoch({self._val_key("val_loss"): val_loss, **epoch})

        def _gathered(self) -> tuple[np.ndarray, np.ndarray]:
            """Validation outputs of all ranks (under DDP each rank saw a shard), on every rank."""
            probs = torch.cat([p for p, _ in self._val_outputs])
            labels = torch.cat([y for _, y in self._val_outputs])
            if self.trainer.world_size > 1:
                probs, labels = self.all_gather(probs).flatten(0, 1), self.all_gather(labels).flatten()
            return probs.cpu().numpy(), labels.cpu().numpy()

        def _print_epoch(self, epoch: dict) -> None:
            """One line per epoch, so DVC and Prefect logs show progress without a TTY."""
            train_loss = float(np.mean(self._train_losses)) if self._train_losses else float("nan")
            self._train_losses.clear()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in {"train_loss": train_loss, **epoch}.items())
            print(f"{label}epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: {shown}", flush=True)

        def configure_optimizers(self):
            return one_cycle(self, config.effective_learning_rate, config.weight_decay, self.slower, config.pretrained_lr_factor)

    return SliceClassifier()


def one_cycle(module, learning_rate: float, weight_decay: float, slower: frozenset[str] = frozenset(), factor: float = 1.0) -> dict:
    """AdamW under a one-cycle schedule over the whole fit, stepped per batch: Lightning's optimiser config. The
    parameters named in ``slower`` (those loaded from starting weights) learn at ``factor`` × the rate, so that a
    few dozen patients fine-tune what another set taught rather than overwrite it."""
    import torch

    groups = rate_groups(module.named_parameters(), learning_rate, slower, factor)
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    schedule = budgeted_one_cycle(optimizer, [group["lr"] for group in groups], module.trainer.estimated_stepping_batches)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def budgeted_one_cycle(optimizer, max_lrs: list[float], total_steps: int):
    """torch's one-cycle schedule, placed at the further of the steps taken and the share of ``max_minutes`` spent
    (``time_share``, set by ``TimeBudget``). Epochs sized for one machine then still anneal on a slower one before
    the time cap stops training, instead of shipping weights from a high learning rate. With no time cap
    ``time_share`` stays 0: torch's schedule exactly."""
    import torch

    class BudgetedOneCycle(torch.optim.lr_scheduler.OneCycleLR):
        time_share = 0.0

        def position(self) -> float:
            """The step the schedule stands at: the further of the steps taken and the time budget's share of them."""
            return max(self.last_epoch, min(self.time_share, 1.0) * (self.total_steps - 1))

        @property
        def progress(self) -> float:
            """How far through training, 0 to 1 (progressive resizing switches sizes by it)."""
            return self.position() / max(1, self.total_steps - 1)

        def get_lr(self) -> list[float]:
            steps = self.last_epoch
            self.last_epoch = self.position()
            try:
                return super().get_lr()
            finally:
                self.last_epoch = steps

    return BudgetedOneCycle(optimizer, max_lr=max_lrs, total_steps=total_steps)


def time_budget(config: TrainConfig) -> list:
    """With ``max_minutes``: the callback that tells the schedule how far through training is by the clock (the share
    of the budget spent, from Lightning's Timer, which also survives a resume), rank 0's share on every rank, so that
    DDP's ranks keep one learning rate."""
    if not config.max_minutes:
        return []
    from lightning.pytorch.callbacks import Callback

    seconds = config.max_minutes * 60

    class TimeBudget(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            share = trainer.strategy.broadcast(min(_timer(trainer).time_elapsed("train") / seconds, 1.0))
            for scheduler in trainer.lr_scheduler_configs:
                if hasattr(scheduler.scheduler, "time_share"):
                    scheduler.scheduler.time_share = share

    return [TimeBudget()]


def _timer(trainer):
    """The Timer Lightning adds for ``max_time`` (None without a time cap)."""
    from lightning.pytorch.callbacks import Timer

    return next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)


def early_stopping(config: TrainConfig):
    """Stops on val_loss after ``patience`` epochs without progress, but not before half the epochs: an early stop
    then would come while the one-cycle learning rate is still high (a lull then, followed by progress, does not stop
    training at half). The time cap is not held back: the rate anneals within it (``budgeted_one_cycle``), so
    ``max_minutes`` is a hard limit."""
    from lightning.pytorch.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason

    first_epoch_to_stop = max(1, config.epochs // 2)

    class PatientEarlyStopping(EarlyStopping):
        too_early = False

        @property
        def state_key(self) -> str:  # Lightning's own key: a checkpoint written by EarlyStopping resumes here
            return "EarlyStopping" + repr({"monitor": self.monitor, "mode": self.mode})

        def _run_early_stopping_check(self, trainer) -> None:
            import torch

            self.too_early = trainer.current_epoch + 1 < first_epoch_to_stop
            early = smaller_size_losses(trainer.callback_metrics, self.monitor)
            if self.monitor in trainer.callback_metrics or not early:
                return super()._run_early_stopping_check(trainer)  # strict: an epoch that logged no loss is an error
            # an epoch validated at a smaller size is not compared with the full-size ones, but a diverged one stops
            if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(early[0])), all=False):
                trainer.should_stop, self.stopped_epoch = True, trainer.current_epoch
                self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC

        def _evaluate_stopping_criteria(self, current):
            should_stop, reason = super()._evaluate_stopping_criteria(current)
            if should_stop and self.too_early and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
                self.stopping_reason = EarlyStoppingReason.NOT_STOPPED  # a non-finite loss still stops at once
                return False, None
            return should_stop, reason

    return PatientEarlyStopping(monitor="val_loss", patience=config.patience)


SMALLER_SIZE = r"_\d+px"  # the suffix of what an epoch validated below image_size logs (_val_key)


def smaller_size_losses(metrics: dict, monitor: str = "val_loss") -> list:
    """The loss an epoch validated below ``image_size`` logged (``<monitor>_<size>px``, ``_val_key``); [] for others."""
    return [value for name, value in metrics.items() if re.fullmatch(monitor + SMALLER_SIZE, name)]


def best_epoch_checkpoint(checkpoints: Path):
    """Lightning's ModelCheckpoint on val_loss, with two changes. It writes ``last.ckpt`` after every epoch: since
    Lightning 2.6 it does so only after a new best, and a killed run would resume from its best epoch, not where it
    stopped. And it passes over the epochs validated at a smaller size (``_val_key``): none of them is kept."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class EveryEpochCheckpoint(ModelCheckpoint):
        _last_saved_at = -1

        def _generate_state_key(self, **kwargs) -> str:  # Lightning's own key: a run interrupted before resumes here
            return f"ModelCheckpoint{kwargs!r}"

        def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
            if self.monitor in monitor_candidates or not smaller_size_losses(monitor_candidates, self.monitor):
                super()._save_topk_checkpoint(trainer, monitor_candidates)  # no loss at all: Lightning's error
            self._save_last_checkpoint(trainer, monitor_candidates)  # after the best: it is part of the state saved

        def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
            if self._last_saved_at != trainer.global_step:  # Lightning calls it again after a new best
                self._last_saved_at = trainer.global_step
                super()._save_last_checkpoint(trainer, monitor_candidates)

    return EveryEpochCheckpoint(dirpath=checkpoints, monitor="val_loss", mode="min", save_last=True)


def rate_groups(named_parameters, learning_rate: float, slower: frozenset[str], factor: float) -> list[dict]:
    """The optimiser's parameter groups: the fresh parameters at ``learning_rate``, those in ``slower`` at ``factor``
    × it (one group when either set is empty)."""
    named = list(named_parameters)
    slower = slower if factor != 1 else frozenset()
    groups = [
        {"params": [p for name, p in named if name not in slower], "lr": learning_rate},
        {"params": [p for name, p in named if name in slower], "lr": learning_rate * factor},
    ]
    return [group for group in groups if group["params"]]


def rank_partition(rows: pd.DataFrame, rank: int, world_size: int, shuffle: bool, seed: int) -> pd.DataFrame:
    """This rank's rows, chosen before any image is read so that each rank prepares and caches only its own
    share. MONAI's partitioning pads by repetition to equal shares (DDP needs the same number of steps on every
    rank); train shares are a seeded shuffle, fixed for the run."""
    from monai.data import partition_dataset

    if world_size == 1:
        return rows
    shares = partition_dataset(list(range(len(rows))), num_partitions=world_size, shuffle=shuffle, seed=seed, even_divisible=True)
    return rows.iloc[shares[rank]]


def _loader(rows: pd.DataFrame, config: TrainConfig, classes: list[str], train: bool, cotraining: pd.DataFrame | None = None):
    """A part's loader. Train's with ``cotraining`` rows: each epoch every train row and ``train.cotrain_share`` × as
    many of those (a fresh draw each epoch: components.dataset.MixedEpochs)."""
    from torch.utils.data import ConcatDataset, DataLoader

    from components.dataset import MixedEpochs

    dataset, sampler = _dataset(rows, config, classes, "read" if config.uses_masks and train else "none"), None
    if cotraining is not None:  # train's, and only when there are any (data_module)
        extra = _dataset(cotraining, config, classes, "absent" if config.uses_masks else "none")
        dataset = ConcatDataset([dataset, extra])
        sampler = MixedEpochs(len(rows), len(cotraining), drawn=round(config.cotrain_share * len(rows)))
    size = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=0,
        drop_last=train and size > config.batch_size,
    )  # fmt: skip


def _dataset(rows: pd.DataFrame, config: TrainConfig, classes: list[str], masks: Literal["read", "absent", "none"]):
    """``masks``: read from the rows' mask files; marked absent, so that slices of a set without masks can share
    batches with masked ones (co-training: the lesion map's loss leaves them out); or none in the batches at all."""
    from components.dataset import SliceDataset, UnmaskedSlices, prepared_images, prepared_masks

    index = {label: i for i, label in enumerate(classes)}
    images = prepared_images(rows, config.image_size, channels=config.in_channels)
    labels = rows["label"].map(index).to_numpy()
    if masks == "absent":
        return UnmaskedSlices(images, labels)
    return SliceDataset(images, labels, prepared_masks(rows, config.image_size) if masks == "read" else None)


def data_module(split: pd.DataFrame, config: TrainConfig, classes: list[str]):
    """Train and val loaders made in ``setup``, which runs in every DDP process once its rank is known; rows of
    split "cotrain" (``cotraining_rows``) join train's epochs."""
    import lightning as L

    parts = {part: split[split["split"] == part] for part in ("train", "val")}
    for part, rows in parts.items():
        if rows.empty:
            raise DataError(config.split, f"the {part} split is empty")
    cotraining = split[split["split"] == "cotrain"]

    class SliceData(L.LightningDataModule):
        def setup(self, stage: str | None = None) -> None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            share = partial(rank_partition, rank=rank, world_size=world, seed=config.seed)
            self.loaders = {
                "train": _loader(
                    share(parts["train"], shuffle=True), config, classes, True, share(cotraining, shuffle=True) if len(cotraining) else None
                ),
                "val": _loader(share(parts["val"], shuffle=False), config, classes, False),
            }

        def train_dataloader(self):
            return self.loaders["train"]

        def val_dataloader(self):
            return self.loaders["val"]

    return SliceData()


def cotraining_rows(config: TrainConfig, classes: list[str]) -> pd.DataFrame:
    """The pretraining set's train images that every epoch draws from (``train.cotrain_share``), labelled in the
    pipeline's classes: a known tumour type the pipeline lacks (glioma, meningioma, pituitary) becomes its tumour class
    when it has just one (LGG: every Masoud tumour is a tumour); any other label (another set's spelling of "no
    tumour" among them) is left out and named. Pretraining teaches another set before the pipeline's few dozen patients
    are fitted; drawn into every epoch, that set also stays in view while they are."""
    rows = pd.read_csv(config.cotrain_split) if _cotrains(config) else pd.DataFrame(columns=["image_id", "label", "path", "split"])
    rows = rows[rows["split"] == "train"]
    tumour_classes = [label for label in classes if label != NO_TUMOUR]
    only_tumour = tumour_classes[0] if len(tumour_classes) == 1 else None
    known_types = {TUMOUR, *TUMOUR_TYPES}
    labels = rows["label"].map(lambda label: label if label in classes else (only_tumour if label in known_types else None))
    kept = rows.assign(label=labels, split="cotrain").dropna(subset=["label"])
    if config.cotrain_share > 0 and is_global_zero():
        _say_cotraining(config, classes, kept, left_out=sorted(set(rows["label"]) - set(rows.loc[labels.notna(), "label"])))
    return kept


def _say_cotraining(config: TrainConfig, classes: list[str], kept: pd.DataFrame, left_out: list[str]) -> None:
    if left_out:
        print(f"co-training leaves out the pretraining labels {left_out}: none of the classes {classes}", flush=True)
    if kept.empty:
        print(
            f"train.cotrain_share {config.cotrain_share} has no effect: no pretraining images fit the classes {classes} (is pretrain.source set?)",
            flush=True,
        )
        return
    counts = ", ".join(f"{label} {count}" for label, count in kept["label"].value_counts().sort_index().items())
    print(
        f"co-training: each epoch also draws {config.cotrain_share} × the train images from {len(kept)} pretraining images ({counts})",
        flush=True,
    )


def class_weights(labels: pd.Series, classes: list[str], drawn: pd.Series | None = None, share: float = 0.0) -> np.ndarray:
    """scikit-learn's 'balanced' weights: rare classes count as much as common ones in the loss. With co-training, over
    what an epoch holds: ``labels`` once and ``share`` × as many of ``drawn``, in their proportions."""
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.asarray(classes), y=labels.to_numpy()).astype(np.float32)
    if drawn is None or drawn.empty or share == 0:
        return weights
    counts = labels.value_counts().reindex(classes, fill_value=0)
    counts = counts + drawn.value_counts(normalize=True).reindex(classes, fill_value=0) * share * len(labels)
    return (counts.sum() / (len(classes) * counts)).to_numpy(np.float32)


def where_masks_exist(config: TrainConfig, split: pd.DataFrame) -> TrainConfig:
    """``config`` with the lesion map switched off when no train slice has a mask (Masoud's slices have none):
    a data set without masks trains as usual rather than failing on a setting meant for those with them."""
    train = split[split["split"] == "train"]
    if not config.uses_masks or ("mask_path" in train and train["mask_path"].notna().any()):
        return config
    print("train.mask_weight: no train slice has a lesion mask, so the network is trained without a lesion map", flush=True)
    return config.model_copy(update={"mask_weight": 0.0})


FINISHED = "finished.pt"  # in a network's checkpoint folder: its best weights, once its training ended


def checkpoint_folder(config: TrainConfig, data_hash: str) -> Path:
    """One folder per (training params, data version): a rerun with both unchanged resumes there. It lies
    outside the stage's outputs, which DVC deletes before a rerun. Starting weights count by content: the pretrain
    stage rewrites its file in place."""
    start = file_hash(config.init_weights) if config.init_weights is not None and config.init_weights.is_file() else None
    cotrain = file_hash(config.cotrain_split) if _cotrains(config) else None  # the rows co-training draws from, by content
    unused = {"early_image_size", "early_share"} if config.early_image_size is None else set()  # runs from before them resume
    identity = {
        **config.model_dump(mode="json", exclude={"threads", "resume", *unused}),
        "data": data_hash,
        "start": start,
        "cotrain": cotrain,
    }
    return config.checkpoint_root / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class LoadedWeights(NamedTuple):
    names: frozenset[str]  # the network's tensors that came from the file
    message: str


def load_initial_weights(net, path: Path, network: int = 0) -> LoadedWeights:
    """A user's pretrained weights (a state dict or a Lightning checkpoint). Tensors whose names and shapes match
    are loaded; the rest (a head for other classes, say) keep their fresh initialisation. From an ensemble's file,
    the ``network``-th of a new ensemble starts from its ``network``-th member (its last when it has fewer)."""
    import torch

    if not path.exists():
        raise DataError(path, "initial weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is no checkpoint
        raise DataError(path, f"not a PyTorch checkpoint ({exc.__class__.__name__})") from None
    state = {key.removeprefix("net."): value for key, value in state.get("state_dict", state).items()}
    own = net.state_dict()
    state, source = _one_members_weights(state, own, network)
    matched = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    if not matched:
        raise DataError(path, "no tensor matches this network: another architecture or width?")
    net.load_state_dict(matched, strict=False)
    return LoadedWeights(frozenset(matched), f"initial weights: {len(matched)} of {len(own)} tensors from {path.name}{source}")


def _one_members_weights(state: dict, own: dict, network: int) -> tuple[dict, str]:
    """One member's weights when ``state`` is an ensemble's (``members.<k>.`` names) and ``own`` (the network to
    start) is not one; else ``state`` itself."""
    members = sorted({int(match[1]) for key in state if (match := re.match(r"members\.(\d+)\.", key))})
    if not members or any(key.startswith("members.") for key in own):
        return state, ""
    member = members[min(network, len(members) - 1)]
    prefix = f"members.{member}."
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}, f" (its member {member + 1})"


def left_by_interruption(config: TrainConfig, folders: list[Path], run_file: Path) -> tuple[list[dict | None], list[Path | None]]:
    """Per network, what an interrupted run of this job left: its finished weights, or else its last whole
    checkpoint. Nothing with ``train.resume`` off or when no run of this job was interrupted (no ``run_file``)."""
    if not (config.resume and run_file.exists()):
        return [None] * len(folders), [None] * len(folders)
    finished = [_readable_finished(folder) for folder in folders]
    return finished, [_readable_checkpoint(f / "last.ckpt") if done is None else None for f, done in zip(folders, finished)]


def _readable_finished(checkpoints: Path) -> dict | None:
    """The weights and epochs of a network that finished before the job was interrupted, if readable."""
    import torch

    if not (checkpoints / FINISHED).exists():
        return None
    try:
        return torch.load(checkpoints / FINISHED, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for a damaged file
        print(f"{checkpoints / FINISHED} is unreadable; that network trains again", flush=True)
        return None


def _readable_checkpoint(last: Path) -> Path | None:
    """The interrupted run's last checkpoint, if there is one and it is whole (a kill while it was being written
    leaves a torn file: then training starts over)."""
    import torch

    if not last.exists():
        return None
    try:
        epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    except Exception:  # torch raises several types for a torn file
        print("the interrupted run's checkpoint is unreadable; training from the start", flush=True)
        return None
    if is_global_zero():
        print(f"resuming the interrupted run from its checkpoint after epoch {epoch + 1}", flush=True)
    return last


def _trainer(config: TrainConfig, logger, checkpoints: Path | None):
    """With ``checkpoints``, the stage's Trainer: checkpoints there, stops early on val_loss (its best epoch is the one
    kept) and may span devices and nodes. Without, a fold's (cross-validation, tuning): in this process, nothing
    written, the last epoch's weights (nothing picked on validation)."""
    import lightning as L

    stage = checkpoints is not None
    checkpointing = [best_epoch_checkpoint(checkpoints), early_stopping(config)] if stage else []
    return L.Trainer(
        **_budget(config),
        accelerator="auto",
        devices=config.devices if stage else 1,
        num_nodes=config.num_nodes if stage else 1,
        strategy="ddp" if stage and config.world_size > 1 else "auto",
        use_distributed_sampler=False,  # the data module hands each rank its own partition
        logger=logger,
        enable_checkpointing=stage,
        callbacks=[*checkpointing, *weight_averaging(config), *time_budget(config)],
        enable_progress_bar=stage and sys.stdout.isatty(),  # a fold's bar would break up the epoch lines
        enable_model_summary=False,
        log_every_n_steps=50,  # metrics are per epoch; logging at every step slowed training (bench/train_throughput.py)
        deterministic=False,
    )


def weight_averaging(config: TrainConfig) -> list:
    """An exponential moving average of the weights: it smooths the last steps' noise out of the model that
    ships. Validation, checkpoints (and so the best one loaded) and the final model all hold the average."""
    if not config.ema_decay:
        return []
    from lightning.pytorch.callbacks import WeightAveraging

    class MovingAverage(WeightAveraging):
        def on_fit_start(self, trainer, module) -> None:  # the average was made before the net moved to its device
            if self._average_model is not None:
                self._average_model.to(module.device)

    return [MovingAverage(multi_avg_fn=ramped_moving_average(config.ema_decay))]


def ramped_moving_average(decay: float):
    """The update of torch's AveragedModel for an EMA with TensorFlow's ramp, rate min(decay, (1 + n) / (10 + n))
    at update n: early on the average spans the last tenth of the steps, so the first, random weights fade at
    once rather than after 1 / (1 - decay) steps."""
    import torch

    @torch.no_grad()
    def update(means: list, currents: list, updates) -> None:
        rate = min(decay, float((1 + updates) / (10 + updates)))
        if torch.is_floating_point(means[0]):
            torch._foreach_lerp_(means, currents, 1 - rate)
        else:  # integer buffers (BatchNorm's batch count): the newest
            torch._foreach_copy_(means, currents)

    return update


def quiet_lightning() -> None:
    """Our own epoch lines replace Lightning's tips, banners and deprecation chatter. Lightning sets its logger to
    INFO when first imported, so it is imported first. Its checkpoint folder also holds the run's MLflow id (resume)."""
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=".*(LeafSpec|does not have many workers|litlogger|overridden `on_after_batch_transfer`|exists and is not empty).*"
    )


def _budget(config: TrainConfig) -> dict:
    """The Trainer settings every fit shares: epochs, the time cap and the numeric precision."""
    time_cap = {"minutes": config.max_minutes} if config.max_minutes else None
    return {"max_epochs": config.epochs, "max_time": time_cap, "precision": trainer_precision(config)}


def trainer_precision(config: TrainConfig) -> str:
    """'auto': fp16 mixed precision on a GPU, full fp32 on a CPU (bf16 there is a choice: 1.7-1.8x faster on CPUs
    with native bf16, AMX or AVX512-BF16, slower on ones without; bench/precision.py)."""
    if config.precision != "auto":
        return config.precision
    return "16-mixed" if _has_cuda() else "32-true"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _start_mlflow_run(config: TrainConfig, spec: ModelSpec, data_hash: str, resumed_run: str | None = None):
    """The job's one MLflow run: the interrupted run again when resuming, so a job stays one run."""
    import mlflow

    use_experiment(config.experiment)
    if resumed_run:
        return mlflow.start_run(run_id=resumed_run)
    run = mlflow.start_run(run_name=f"train-{spec.network}-{spec.image_size}px")
    params = config.model_dump(mode="json", exclude={"split", "out_dir", "experiment"})
    # DDP splits each epoch across devices × nodes, each taking batch_size per step: the effective batch grows with
    # them; lr_scaling says whether the learning rate follows (linear) or stays as given (none)
    effective = {
        "effective_batch_size": config.batch_size * config.world_size,
        "learning_rate_scaling": config.lr_scaling,
        "effective_learning_rate": config.effective_learning_rate,
    }
    mlflow.log_params({**params, **effective, "classes": ",".join(spec.classes), "data_hash": data_hash})
    mlflow.set_tags(_provenance_tags(config))
    return run


def _cotrains(config: TrainConfig) -> bool:
    return config.cotrain_share > 0 and config.cotrain_split is not None and config.cotrain_split.is_file()


def _provenance_tags(config: TrainConfig) -> dict[str, str]:
    """Which weights training started from, as run tags: their content hash and, for the pretrain stage's, its run;
    and the content hash of the split co-training drew from."""
    tags = {"tumorscope.cotrain_split_hash": file_hash(config.cotrain_split)} if _cotrains(config) else {}
    if config.init_weights is None or not config.init_weights.is_file():
        return tags
    from components.pretrain import SUMMARY_FILE  # written beside its weights

    tags["tumorscope.init_weights_hash"] = file_hash(config.init_weights)
    summary = config.init_weights.parent / SUMMARY_FILE
    if summary.is_file():
        tags["tumorscope.pretrained_run"] = json.loads(summary.read_text()).get("run_id", "")
    return tags


def model_spec(config: TrainConfig, classes: list[str]) -> ModelSpec:
    return ModelSpec(
        network=config.network,
        image_size=config.image_size,
        channels=config.channels,
        blocks=config.blocks,
        classes=classes,
        norm=config.norm,
        in_channels=config.in_channels,
        lesion_head=config.uses_masks,
        members=config.members,
    )


def member_configs(config: TrainConfig) -> list[TrainConfig]:
    """One config per network of an ensemble (``train.members``): seeds seed, seed + 1, …, and an equal share of
    ``max_minutes`` each, so an ensemble keeps the time budget of one network."""
    if config.members == 1:
        return [config]
    minutes = config.max_minutes / config.members if config.max_minutes else None
    return [config.model_copy(update={"seed": config.seed + k, "max_minutes": minutes, "members": 1}) for k in range(config.members)]


def _prepared(config: TrainConfig, split: pd.DataFrame) -> tuple[TrainConfig, ModelSpec, np.ndarray, pd.DataFrame]:
    """What every fit on ``split`` starts from: the config as the data allows it, the model spec, the class weights,
    and the split with the co-training rows (split "cotrain") added."""
    import torch

    quiet_lightning()
    torch.set_num_threads(config.threads)
    config = where_masks_exist(config, split)
    classes = sorted(split["label"].unique())
    cotraining = cotraining_rows(config, classes)
    weights = class_weights(split.loc[split["split"] == "train", "label"], classes, cotraining["label"], config.cotrain_share)
    return config, model_spec(config, classes), weights, pd.concat([split, cotraining], ignore_index=True)


def _fit_network(
    config: TrainConfig,
    spec: ModelSpec,
    split: pd.DataFrame,
    weights: np.ndarray,
    which: tuple[int, int],
    checkpoints: Path | None = None,
    logger=False,
    resume_from: Path | None = None,
):
    """One network's fit, the same for the stage and for the folds of cross-validation and tuning (see ``_trainer``
    for what ``checkpoints`` changes): seeded, from ``train.init_weights`` when given. The module and its trainer."""
    import lightning as L

    label = _member_label(*which)
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = lightning_module(spec, config, weights, label)
    if config.init_weights is not None:
        loaded = load_initial_weights(module.net, config.init_weights, which[0])
        module.slower = frozenset(f"net.{name}" for name in loaded.names)
        if is_global_zero():
            print(label + loaded.message, flush=True)
    elif config.pretrained_lr_factor != 1 and is_global_zero():
        print(f"{label}train.pretrained_lr_factor {config.pretrained_lr_factor} has no effect: no starting weights", flush=True)
    trainer = _trainer(config, logger, checkpoints)
    trainer.fit(module, datamodule=data_module(split, config, spec.classes), ckpt_path=resume_from)
    _say_if_cut_short(trainer, label)
    return module, trainer


def _fit(config: TrainConfig, split: pd.DataFrame) -> tuple[Classifier, float]:
    """Fit on ``split``'s train rows; the classifier and the last epoch's validation ROC-AUC (tumour vs none; of
    the last network of an ensemble). Nothing is logged, checkpointed or saved."""
    config, spec, weights, split = _prepared(config, split)
    nets, auc = [], float("nan")
    for k, member in enumerate(member_configs(config)):
        module, trainer = _fit_network(member, spec.member, split, weights, (k, config.members))
        nets.append(module.net)
        auc = float(trainer.callback_metrics.get("val_auc", float("nan")))
    return Classifier(spec, one_network(nets)), auc


def _say_if_cut_short(trainer, label: str) -> None:
    """``max_minutes`` stopping training before its last epoch: the learning rate followed the time budget down
    (``budgeted_one_cycle``), but the network saw fewer epochs than asked for, a silent change unless the run's
    output says so."""
    timer = _timer(trainer)
    remaining = timer.time_remaining() if timer is not None else None
    early_stop = trainer.early_stopping_callback
    if (
        remaining is None
        or remaining > 0
        or (early_stop and early_stop.stopped_epoch)
        or trainer.global_step >= trainer.estimated_stepping_batches
    ):
        return
    if trainer.is_global_zero:
        share = " (this network's share of it)" if label else ""
        print(
            f"{label}max_minutes{share} stopped training at step {trainer.global_step} of {trainer.estimated_stepping_batches} "
            f"(epoch {trainer.current_epoch} of {trainer.max_epochs}); the learning rate annealed within the time: "
            "fewer epochs fit this machine",
            flush=True,
        )


def _member_name(k: int) -> str:
    """An ensemble's k-th network (from 0) in folder and metric names: member1, member2, …"""
    return f"member{k + 1}"


def _member_label(k: int, members: int) -> str:
    return f"member {k + 1}/{members}: " if members > 1 else ""


def fit_classifier(
    config: TrainConfig, split: pd.DataFrame, calibration: CalibrateConfig | None = None
) -> tuple[Classifier, dict[str, float]]:
    """``_fit``, then calibrated and thresholded on ``split``'s val rows as the calibrate stage does: one fold of a
    cross-validation (bench/quality.py), answering as a registered model does. Also what was fitted on validation,
    with the figures there (temperature, thresholds, sensitivity and specificity at the threshold, ECE)."""
    from components.calibrate import fit_on_validation

    classifier, _ = _fit(config, split)
    return classifier, fit_on_validation(classifier, split[split["split"] == "val"], calibration or CalibrateConfig())


def validation_auc(config: TrainConfig, split: pd.DataFrame) -> float:
    """One tuning trial's score on one fold."""
    return _fit(config, split)[1]


def run(config: TrainConfig) -> dict:
    if not config.split.exists():
        raise DataError(config.split, "split not found: run the split stage first")
    split = pd.read_csv(config.split)
    config, spec, weights, split = _prepared(config, split)
    data_hash = file_hash(config.split)
    checkpoints = checkpoint_folder(config, data_hash)
    run_file = checkpoints / "mlflow_run_id"
    members = member_configs(config)
    folders = [checkpoints] if len(members) == 1 else [checkpoints / _member_name(k) for k in range(len(members))]
    finished, resume_from = left_by_interruption(config, folders, run_file)
    resuming = any(left is not None for left in (*finished, *resume_from))
    mlflow_run = _start_mlflow_run(config, spec, data_hash, run_file.read_text() if resuming else None) if is_global_zero() else None
    if mlflow_run is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        run_file.write_text(mlflow_run.info.run_id)
    # the run ends when this block does: FAILED on an error or exit (SIGTERM, Ctrl-C); without it, MLflow's exit hook ends it FINISHED
    with mlflow_run if mlflow_run is not None else contextlib.nullcontext():
        trained = [
            _train_network(member, spec.member, split, weights, folder, mlflow_run, (done, point), (k, len(members)))
            for k, (member, folder, done, point) in enumerate(zip(members, folders, finished, resume_from))
        ]
        if not is_global_zero():
            return {}
        classifier = Classifier(spec, one_network([net for net, _ in trained]))
        published = _publish(classifier, config, mlflow_run, data_hash, sum(epochs for _, epochs in trained))
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing to resume
    return published


def _train_network(
    config: TrainConfig,
    spec: ModelSpec,
    split: pd.DataFrame,
    weights: np.ndarray,
    checkpoints: Path,
    mlflow_run,
    earlier: tuple[dict | None, Path | None],
    which: tuple[int, int],
) -> tuple:
    """One network, trained with checkpoints in ``checkpoints``: its best weights on global rank 0, and the epochs
    it trained. ``earlier``: what an interrupted run of the same job left, the network finished (read back, not
    retrained) or its last checkpoint (resumed)."""
    import torch

    finished, resume_from = earlier
    if finished is not None:
        net = build_network(spec)
        net.load_state_dict(finished["net"])
        if is_global_zero():
            print(f"{_member_label(*which)}finished before the interruption: read back, not retrained", flush=True)
        return net, int(finished["epochs"])
    prefix = _member_name(which[0]) if which[1] > 1 else ""  # an ensemble's networks log "member1-val_loss", …
    logger = _network_logger(mlflow_run.info.run_id, prefix) if mlflow_run else False
    module, trainer = _fit_network(config, spec, split, weights, which, checkpoints, logger, resume_from)
    if not trainer.is_global_zero:
        return module.net, trainer.current_epoch
    checkpoint = trainer.checkpoint_callback
    best = torch.load(checkpoint.best_model_path or checkpoint.last_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    partial = checkpoints / f"{FINISHED}.partial"  # renamed once whole: a kill mid-write leaves no torn finished.pt
    torch.save({"net": module.net.state_dict(), "epochs": trainer.current_epoch}, partial)
    os.replace(partial, checkpoints / FINISHED)
    return module.net, trainer.current_epoch


def _network_logger(run_id: str, prefix: str):
    """Lightning's MLflow logger, except that a network's end does not end the run: the job's run goes on to the
    next network and the saved weights, and ``run`` ends it. A failure in training marks it
    FAILED. (The skipped part of finalize also logs checkpoints as artifacts, which only log_model=True asks for.)"""
    from lightning.pytorch.loggers import MLFlowLogger

    class NetworkLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            if status == "failed":
                super().finalize(status)

    return NetworkLogger(tracking_uri=get_settings().tracking_uri, run_id=run_id, prefix=prefix)


def _publish(classifier: Classifier, config: TrainConfig, mlflow_run, data_hash: str, epochs: int) -> dict:
    """Save the networks and their spec for the calibrate stage, which fits how they answer and logs them as the
    model that can be registered."""
    import mlflow

    run_id = mlflow_run.info.run_id
    mlflow.log_metric("epochs_trained", epochs)
    extra = {"run_id": run_id, "data_hash": data_hash, "calibrated": False}  # temperature 1 and threshold 0.5 until calibrate
    classifier.save(config.out_dir, extra)
    print(f"trained {epochs} epochs; MLflow run {run_id}", flush=True)
    return extra


def torchrun_command(config: TrainConfig) -> list[str] | None:
    """The command that joins this node to a multi-node job (train.num_nodes > 1), or None when this process
    trains itself: one node (Lightning starts its own `devices` processes) or already under torchrun."""
    if config.num_nodes == 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    settings = get_settings()
    if not settings.rdzv_endpoint:
        raise TumorScopeError(
            f"train.num_nodes is {config.num_nodes}: set TUMORSCOPE_RDZV_ENDPOINT=host:port (node 0's address) on every node"
        )
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(config.num_nodes), "--nproc-per-node", str(config.devices),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", settings.rdzv_endpoint, "--rdzv-id", settings.rdzv_id,
            "-m", "components.train"]  # fmt: skip


def main() -> None:
    import subprocess

    from components.stage import run_stage

    def work() -> dict | None:
        config = load_params().train_as_run  # from the pretrain stage's weights when it pretrained
        command = torchrun_command(config)
        if command is None:
            return run(config)
        print(f"joining a {config.num_nodes}-node training job at {get_settings().rdzv_endpoint} (torchrun)", flush=True)
        if code := subprocess.call(command):
            raise SystemExit(code)
        return None

    run_stage(work)


if __name__ == "__main__":
    main()
