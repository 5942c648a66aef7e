"""The set-overlap benchmark: a copy of a slice is found through any of its channels, and reported by pseudonym."""

import numpy as np
from PIL import Image

from components.dedup import thumbnail
from tests.conftest import bench_module

overlap = bench_module("set_overlap")


def test_each_image_keeps_its_best_view_against_every_reference_image():
    rng = np.random.default_rng(0)
    reference = np.stack([thumbnail(rng.random((64, 64))) for _ in range(3)])
    unrelated = thumbnail(rng.random((64, 64)))
    queries = np.stack([unrelated, reference[2], unrelated, unrelated])  # image 0: a channel is reference 2; image 1: neither
    best, which = overlap.closest_matches(reference, queries, np.array([0, 0, 1, 1]))
    assert best[0] > 0.999 and which[0] == 2
    assert best[1] < 0.5


def test_a_colour_slice_is_compared_by_its_mean_and_each_channel_and_a_blank_one_not_at_all(tmp_path):
    rng = np.random.default_rng(1)
    colour = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    colour[..., 2] = 0  # a blank channel (a sequence the study lacks) matches nothing
    Image.fromarray(colour).save(tmp_path / "slice.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(colour[..., 0]).save(tmp_path / "slice_mask.png")
    assert [p.name for p in overlap.image_files(tmp_path)] == ["blank.png", "slice.png"], "masks are labels, not images"
    assert len(overlap.views(tmp_path / "slice.png", "img-1")) == 3 and overlap.views(tmp_path / "blank.png", "img-2") == []
