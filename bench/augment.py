"""Benchmark of the train stage's batch augmentation (components.dataset.augment_batch) against the same
distribution built the textbook way, side by side in one run.

The textbook way is torch's ``F.affine_grid`` (a batched matrix product over every pixel) and noise and a
contrast power drawn for the whole batch, then masked to the 30 % of slices that get them. The stage builds
the grid as two broadcast planes and draws noise and contrast only for the slices that get them. Prints
milliseconds per batch of each and their ratio, per input size; `augment_batch` runs before every training
step, so at 224 px it is a share of each epoch (a step of the `masoud` preset's network takes ~0.7 s).

    .venv/bin/python bench/augment.py [--batch 64] [--sizes 128 224] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def textbook_augment(images):
    """The distribution of ``augment_batch`` (its own pose), every other op over the whole batch."""
    import torch
    import torch.nn.functional as F

    from components.dataset import random_pose

    n = images.shape[0]
    uniform = lambda *shape: torch.rand(*shape) * 2 - 1  # noqa: E731
    theta = random_pose(n, images.shape[-1])
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_min(0)
    gamma = torch.where(torch.rand(n) < 0.3, torch.exp(uniform(n) * 0.223), 1.0)
    out = out ** gamma.view(n, 1, 1, 1)
    noisy = (torch.rand(n) < 0.3).view(n, 1, 1, 1)
    return out + noisy * torch.randn_like(out) * 0.02


def milliseconds(augment, images, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        augment(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from components.dataset import augment_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for size in args.sizes:
        images = torch.rand(args.batch, 1, size, size)
        for augment in (augment_batch, textbook_augment):  # warm both
            augment(images)
        stage, textbook = milliseconds(augment_batch, images, args.repeats), milliseconds(textbook_augment, images, args.repeats)
        print(f"{size} px, batch {args.batch}: augment_batch {stage:.1f} ms, textbook {textbook:.1f} ms: {textbook / stage:.2f}x faster")


if __name__ == "__main__":
    main()
