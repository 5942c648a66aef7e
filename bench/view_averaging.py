"""Whether averaging a trained network over more test-time views than the mirror would help it, judged paired.

Run in a workspace after `tumorscope run`. The calibrated network (``models_calibrated/``) scores every
validation and test slice once per view: as it is, mirrored left-right (the two `calibrate.flip_averaging`
averages), zoomed in and out by 10 %, turned by ±8° and shifted by 5 % of the side, the last three also
mirrored. Each set of views averages its logits, as the shipped mirror average does; the temperature is
refitted on validation per set, so the negative log-likelihood compares sets fairly. Prints validation and
test 4-class accuracy (argmax), errors and NLL per set: one network, all sets on the same slices, so the
differences are the views' and not a seed's.

    .venv/bin/python bench/view_averaging.py [--workspace W]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

# name: (scale of the sampling grid (< 1 zooms in), degrees, shift as a share of the half side, mirrored)
VIEWS: dict[str, tuple[float, float, float, bool]] = {
    "as is": (1.0, 0.0, 0.0, False),
    "mirror": (1.0, 0.0, 0.0, True),
    "zoom in": (1 / 1.1, 0.0, 0.0, False),
    "zoom in, mirror": (1 / 1.1, 0.0, 0.0, True),
    "zoom out": (1.1, 0.0, 0.0, False),
    "zoom out, mirror": (1.1, 0.0, 0.0, True),
    "turn +8": (1.0, 8.0, 0.0, False),
    "turn -8": (1.0, -8.0, 0.0, False),
    "turn +8, mirror": (1.0, 8.0, 0.0, True),
    "turn -8, mirror": (1.0, -8.0, 0.0, True),
    "shift": (1.0, 0.0, 0.1, False),
    "shift, mirror": (1.0, 0.0, -0.1, True),
}
SHIPPED = ["as is", "mirror"]
VIEW_SETS = {
    "as is": ["as is"],
    "as is + mirror (shipped)": SHIPPED,
    "+ zoom in": [*SHIPPED, "zoom in", "zoom in, mirror"],
    "+ zoom out": [*SHIPPED, "zoom out", "zoom out, mirror"],
    "+ both zooms": [*SHIPPED, "zoom in", "zoom in, mirror", "zoom out", "zoom out, mirror"],
    "+ turns": [*SHIPPED, "turn +8", "turn -8", "turn +8, mirror", "turn -8, mirror"],
    "+ shifts": [*SHIPPED, "shift", "shift, mirror"],
    "all twelve": list(VIEWS),
}


def viewed(images, scale: float, degrees: float, shift: float, mirrored: bool):
    """The batch (N, C, S, S) as one view: zoomed, turned and shifted about the centre, then maybe mirrored."""
    import torch
    import torch.nn.functional as F

    if (scale, degrees, shift) != (1.0, 0.0, 0.0):
        angle = math.radians(degrees)
        theta = torch.tensor(
            [[scale * math.cos(angle), -scale * math.sin(angle), shift], [scale * math.sin(angle), scale * math.cos(angle), shift]],
            dtype=images.dtype,
        )
        grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, align_corners=False)
    return images.flip(-1) if mirrored else images


def view_logits(classifier, images: list[np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Every view's logits (N, classes) of raw slices, prepared as the model's input."""
    import torch

    parts: dict[str, list[np.ndarray]] = {name: [] for name in VIEWS}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(classifier.batch(images[start : start + batch_size]))
        with torch.inference_mode():
            for name, view in VIEWS.items():
                parts[name].append(classifier.net(viewed(batch, *view).contiguous(memory_format=torch.channels_last)).float().numpy())
    return {name: np.concatenate(logits) for name, logits in parts.items()}


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels]))


def compared(parts: dict[str, tuple[dict[str, np.ndarray], np.ndarray]]) -> pd.DataFrame:
    """Accuracy, errors and NLL of each view set on each part; the temperature is fitted on 'val'."""
    from components.model import fit_temperature

    rows = []
    for name, members in VIEW_SETS.items():
        row: dict[str, object] = {"views": name}
        averaged = {part: np.mean([logits[m] for m in members], axis=0) for part, (logits, _) in parts.items()}
        temperature = fit_temperature(averaged["val"], parts["val"][1])  # the calibrate stage's own fit
        for part, (_, labels) in parts.items():
            wrong = averaged[part].argmax(1) != labels
            row |= {
                f"{part} accuracy": 1 - wrong.mean(),
                f"{part} errors": int(wrong.sum()),
                f"{part} NLL": nll(averaged[part], labels, temperature),
            }
        rows.append(row | {"temperature": temperature})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("."), help="a workspace after `tumorscope run`")
    args = parser.parse_args()
    folder, split_file = args.workspace / "models_calibrated", args.workspace / "data" / "split.csv"
    if not (folder / "model.pt").exists() or not split_file.exists():
        raise SystemExit(f"skipped: no calibrated model in {args.workspace.resolve()} (run `tumorscope run` there first)")
    import torch

    from components.imaging import read_slice
    from components.model import Classifier

    torch.set_num_threads(2)
    classifier = Classifier.load(folder)
    if classifier.spec.members > 1 or classifier.spec.lesion_vote:
        raise SystemExit("skipped: the views are compared on one plain network (no ensemble, no lesion vote)")
    split, classes = pd.read_csv(split_file), classifier.spec.classes
    parts = {}
    for part in ("val", "test"):
        rows = split[split["split"] == part]
        images = [
            read_slice(str(args.workspace / path), name=name, color=classifier.spec.in_channels == 3)
            for path, name in zip(rows["path"], rows["image_id"])
        ]
        parts[part] = (view_logits(classifier, images), rows["label"].map(classes.index).to_numpy())
    print(f"{args.workspace.resolve()}: {len(parts['val'][1])} validation and {len(parts['test'][1])} test slices, classes {classes}")
    print(compared(parts).to_string(index=False, float_format=lambda value: f"{value:.4f}"))


if __name__ == "__main__":
    main()
