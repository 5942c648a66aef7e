"""Benchmark of one training step in bf16 mixed precision against full fp32, side by side in one run.

`train.precision: bf16-mixed` (the `masoud` and `lgg` presets) pays only on CPUs with native bf16 units
(AMX on recent Xeons, AVX512-BF16 on Zen 4 EPYCs); elsewhere it is emulated and slower than fp32, which is why
`auto` means fp32 on a CPU. This measures it on the machine at hand: the preset's network, its batch, an AdamW
step, the two precisions interleaved so that the machine's speed drifts alike for both. Prints seconds per step
and the fp32/bf16 ratio per input size.

    .venv/bin/python bench/precision.py [--preset masoud] [--sizes 128 224] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def training_step(net, optimiser, images, labels, bf16: bool) -> None:
    """Forward, loss, backward and update, as the train stage's Lightning step does them."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def median_seconds(tasks: dict, repeats: int) -> dict:
    """Median seconds of each task, run in turn ``repeats`` times after one warm-up run of each: interleaved, so
    that the machine's speed drifts alike for all."""
    for task in tasks.values():
        task()
    seen: dict = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            seen[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seen.items()}


def seconds_per_step(net, optimiser, images, labels, repeats: int) -> dict[bool, float]:
    """Median seconds of a step in each precision (True: bf16), after one warm-up step of each."""
    steps = {bf16: partial(training_step, net, optimiser, images, labels, bf16) for bf16 in (True, False)}
    return median_seconds(steps, repeats)


def preset_network(config):
    """The preset's network (``config``: its train section) in channels-last layout, and its classes."""
    import torch

    from components.model import ModelSpec, build_network

    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    spec = ModelSpec(network=config.network, image_size=config.image_size, channels=config.channels, blocks=config.blocks,
                     classes=classes, in_channels=config.in_channels, norm=config.norm)  # fmt: skip
    return build_network(spec).to(memory_format=torch.channels_last), classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="masoud", help="a data set's settings (params/<name>.yaml)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default: the preset's early and final sizes)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from components.config import params_with_preset

    config = params_with_preset(args.preset, PROJECT / "params.yaml").train
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    net, classes = preset_network(config)
    net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    sizes = args.sizes or sorted({size for size in (config.early_image_size, config.image_size) if size})
    print(f"preset {args.preset}: {config.network} {config.channels}x{config.blocks}, batch {config.batch_size}, {config.threads} threads")
    for size in sizes:
        images = torch.rand(config.batch_size, config.in_channels, size, size).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, len(classes), (config.batch_size,))
        step = seconds_per_step(net, optimiser, images, labels, args.repeats)
        print(
            f"{size} px: bf16-mixed {step[True]:.3f} s/step, fp32 {step[False]:.3f} s/step: bf16 is {step[False] / step[True]:.2f}x fp32's speed"
        )


if __name__ == "__main__":
    main()
