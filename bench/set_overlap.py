"""Does one image set contain images of another? Checked before weights trained on set A start a network for set B.

Masoud's set is a merge of public sets whose sources are not all documented; if it held TCGA-LGG slices, a network
pretrained on it would have seen LGG's test patients. Every image of B (each channel of a colour slice, and
their mean) is compared with every image of A by the correlation of 32×32 thumbnails, the measure ingestion
groups near-duplicates by (components/dedup.py; consecutive slices of one series correlate 0.97-0.98).

    .venv/bin/python bench/set_overlap.py ../shared/data/masoud-224/Training ../shared/data/lgg-kaggle_3m/kaggle_3m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.dedup import closest_matches, views  # noqa: E402
from components.imaging import read_slice  # noqa: E402
from components.privacy import pseudonym  # noqa: E402
from components.settings import get_settings  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
THRESHOLDS = (0.90, 0.95, 0.97, 0.98)


def image_files(root: Path) -> list[Path]:
    """Every slice under ``root``; LGG's masks are labels, not images."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="set A (e.g. the pretraining set)")
    parser.add_argument("query", type=Path, help="set B (e.g. the set the pretrained network is judged on)")
    parser.add_argument("--show", type=int, default=5, help="print the closest pairs")
    args = parser.parse_args()
    key = get_settings().secret_key()  # the workspace's: a slice gets the image_id ingestion gives it

    def thumbnails(root: Path, every_view: bool) -> tuple[list[str], list[np.ndarray], list[int]]:
        """Pseudonyms of the images with any content, their views, and which image each view is of."""
        names, kept, owner = [], [], []
        for path in image_files(root):
            name = pseudonym(str(path.relative_to(root)), key, "img-")
            seen = views(read_slice(path, name=name, color=True), mirror=every_view)[
                : None if every_view else 1
            ]  # a blank image matches nothing: left out
            if seen:
                kept += seen
                owner += [len(names)] * len(seen)
                names.append(name)
        return names, kept, owner

    reference_names, reference_views, _ = thumbnails(args.reference, every_view=False)
    query_names, query_views, owner = thumbnails(args.query, every_view=True)
    best, which = closest_matches(np.stack(reference_views), np.stack(query_views), np.array(owner))
    print(f"{len(query_names)} images of {args.query} against {len(reference_names)} of {args.reference} (blank ones left out)")
    print(
        f"highest correlation per image: median {np.median(best):.3f}, 99th percentile {np.quantile(best, 0.99):.3f}, max {best.max():.3f}"
    )
    for threshold in THRESHOLDS:
        print(f"  images at >= {threshold:.2f}: {(best >= threshold).sum()}")
    for index in np.argsort(-best)[: args.show]:  # file names can hold patient IDs (LGG's TCGA barcodes): pseudonyms only
        print(f"  {best[index]:.3f}  {args.query.name} {query_names[index]}  ~  {args.reference.name} {reference_names[which[index]]}")


if __name__ == "__main__":
    main()
