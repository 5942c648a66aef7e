"""Benchmark of a progressive-resizing early epoch validated at the full size (as until stop 32) against at the
size it trained at (now), side by side in one run.

With `train.early_image_size` S the early epochs train on batches downsized to S px. Validating them at
`image_size` costs about (image_size / S)² as much per slice as at S, and there the network, trained at S,
scored 0.36-0.59 accuracy on Masoud. This times, on the preset's network in its precision and interleaved so
that the machine's speed drifts alike for all three: a training step at S, a validation batch at `image_size`,
and a validation batch resized to S (the resize included). Then it composes one early epoch of the split's sizes
both ways and prints the ratio.

    .venv/bin/python bench/early_validation.py [--preset masoud] [--train 3649 --val 912] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "bench")]

from precision import median_seconds, preset_network, training_step  # noqa: E402  (the path above first)


def validation_batch(net, images, size: int, bf16: bool) -> None:
    """The validation step's work: the batch resized to ``size`` (``at_size``, a no-op at its own size), a forward pass."""
    import torch

    from components.dataset import at_size

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(at_size(images, size).contiguous(memory_format=torch.channels_last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="masoud", help="a data set's settings (params/<name>.yaml)")
    parser.add_argument("--train", type=int, default=3649, help="training slices (the masoud preset's split: 3,649)")
    parser.add_argument("--val", type=int, default=912, help="validation slices (the masoud preset's split: 912)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from components.config import params_with_preset

    config = params_with_preset(args.preset, PROJECT / "params.yaml").train
    if config.early_image_size is None:
        sys.exit(f"preset {args.preset} trains at one size (train.early_image_size is not set): nothing to compare")
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    net, classes = preset_network(config)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    bf16, early, full, batch = config.precision.startswith("bf16"), config.early_image_size, config.image_size, config.batch_size
    small = torch.rand(batch, config.in_channels, early, early).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(classes), (batch,))
    prepared = torch.rand(batch, config.in_channels, full, full)  # validation slices are prepared at image_size

    def train() -> None:
        net.train()
        training_step(net, optimiser, small, labels, bf16)

    def validate(size: int):
        def batch() -> None:
            net.eval()
            validation_batch(net, prepared, size, bf16)

        return batch

    tasks = {"train": train, "validate_full": validate(full), "validate_early": validate(early)}
    seconds = median_seconds(tasks, args.repeats)
    steps, val_batches = args.train // batch, math.ceil(args.val / batch)
    training = steps * seconds["train"]
    before, after = training + val_batches * seconds["validate_full"], training + val_batches * seconds["validate_early"]
    early_epochs = round(config.epochs * config.early_share)
    print(
        f"preset {args.preset}: {config.network} {config.channels}x{config.blocks}, batch {batch}, {config.precision}, {config.threads} threads"
    )
    print(f"a training step at {early} px: {seconds['train']:.3f} s; a validation batch at {full} px: {seconds['validate_full']:.3f} s, "
          f"resized to {early} px: {seconds['validate_early']:.3f} s ({seconds['validate_full'] / seconds['validate_early']:.2f}x)")  # fmt: skip
    print(f"an early epoch ({steps} steps, {val_batches} validation batches): {before:.1f} s validated at {full} px, "
          f"{after:.1f} s at {early} px: {before / after:.2f}x; over the preset's {early_epochs} early epochs {(before - after) * early_epochs / 60:.1f} min saved")  # fmt: skip


if __name__ == "__main__":
    main()
