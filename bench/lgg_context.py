"""LGG cross-validation with the neighbouring slices' FLAIR as input channels (2.5D): an experiment, before the product
carries series context through ingestion, batch prediction and serving.

LGG's misses sit at a tumour's first and last slices, where the lesion is a few pixels wide; a reader scrolls the
series and sees it grow. This runs bench/quality.py unchanged (same folds, preset and seed), with every slice read
as it would be given its series:

- ``--context flair``: FLAIR of the slice below, the slice itself and the slice above (3 channels; T1 and T1c dropped);
- ``--context all``: T1, FLAIR, T1c, then FLAIR below and above (5 channels).

The first and last slice of a series repeat their own FLAIR where a neighbour is missing. Slice numbers come from
the kaggle_3m file names (``<study>_<n>.png``).

    .venv/bin/python bench/lgg_context.py --context all --data ../shared/data/lgg-kaggle_3m/kaggle_3m --preset lgg --folds 5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "bench")]

from components.ingest import LGG_SLICE_NUMBER  # noqa: E402  (the path above first)

FLAIR = 1  # kaggle_3m's channel order: pre-contrast T1, FLAIR, post-contrast T1
CHANNELS = {"flair": 3, "all": 5}


def neighbour(path: Path, step: int) -> Path:
    """The series' slice ``step`` away, or ``path`` itself at the series' end."""
    number = LGG_SLICE_NUMBER.search(path.stem)
    other = path.with_name(f"{path.stem[: number.start(1)]}{int(number[1]) + step}{path.suffix}")
    return other if other.exists() else path


def with_context(read_slice, context: str):
    """``components.imaging.read_slice`` that reads a colour slice with its neighbours' FLAIR as more channels."""

    def read(source, name=None, color=False):
        image = read_slice(source, name=name, color=color)
        if not color or isinstance(source, bytes) or LGG_SLICE_NUMBER.search(Path(source).stem) is None:
            return image
        below, above = (read_slice(neighbour(Path(source), step), name=name, color=True)[..., FLAIR] for step in (-1, 1))
        flair = image[..., FLAIR]
        planes = [below, flair, above] if context == "flair" else [*np.moveaxis(image, -1, 0), below, above]
        return np.stack(planes, axis=-1)

    return read


def main() -> None:
    arguments = sys.argv[1:]
    if "--context" not in arguments[:-1] or arguments[arguments.index("--context") + 1] not in CHANNELS:
        raise SystemExit(f"usage: lgg_context.py --context {{{','.join(CHANNELS)}}} <bench/quality.py arguments>")
    at = arguments.index("--context")
    context = arguments[at + 1]
    del arguments[at : at + 2]
    import components.config
    import components.dataset
    import components.imaging

    components.imaging.read_slice = components.dataset.read_slice = with_context(components.imaging.read_slice, context)
    preset_params = components.config.params_with_preset

    def with_channels(*args):  # TrainConfig accepts 1 or 3 channels (what the product reads); the experiment's network takes more
        params = preset_params(*args)
        return params.model_copy(update={"train": params.train.model_copy(update={"in_channels": CHANNELS[context]})})

    components.config.params_with_preset = with_channels
    import quality

    sys.argv = [str(PROJECT / "bench" / "quality.py"), *arguments]
    print(f"context {context}: {CHANNELS[context]} input channels", flush=True)
    quality.main()


if __name__ == "__main__":
    main()
