"""The set-overlap benchmark's file listing (the comparison itself is components.dedup's: tests/test_dedup.py)."""

import numpy as np
from PIL import Image

from tests.conftest import bench_module

overlap = bench_module("set_overlap")


def test_masks_are_not_listed_as_images(tmp_path):
    rng = np.random.default_rng(1)
    colour = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    colour[..., 2] = 0  # a blank channel (a sequence the study lacks) matches nothing
    Image.fromarray(colour).save(tmp_path / "slice.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(colour[..., 0]).save(tmp_path / "slice_mask.png")
    assert [p.name for p in overlap.image_files(tmp_path)] == ["blank.png", "slice.png"], "masks are labels, not images"
