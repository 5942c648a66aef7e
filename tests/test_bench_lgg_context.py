"""The 2.5D experiment's input: a slice's neighbours are found by their number in the series and stop at its ends."""

import numpy as np
from PIL import Image

from components.imaging import read_slice
from tests.conftest import bench_module

context = bench_module("lgg_context")


def _series(folder, slices: int) -> None:
    """Slice n's T1, FLAIR and T1c are 10n, 10n + 1 and 10n + 2 everywhere, so each plane says where it came from."""
    folder.mkdir()
    for n in range(1, slices + 1):
        planes = np.full((8, 8, 3), [10 * n, 10 * n + 1, 10 * n + 2], np.uint8)
        Image.fromarray(planes).save(folder / f"CASE_{n}.png")


def _origin(image: np.ndarray) -> list[int]:
    return [round(float(image[0, 0, c]) * 255) for c in range(image.shape[-1])]


def test_a_slice_is_read_with_its_neighbours_flair_and_the_series_ends_repeat_their_own(tmp_path):
    _series(tmp_path / "CASE", 3)
    flair_only = context.with_context(read_slice, "flair")
    everything = context.with_context(read_slice, "all")
    assert _origin(flair_only(tmp_path / "CASE" / "CASE_2.png", color=True)) == [11, 21, 31]
    assert _origin(everything(tmp_path / "CASE" / "CASE_2.png", color=True)) == [20, 21, 22, 11, 31]
    assert _origin(flair_only(tmp_path / "CASE" / "CASE_1.png", color=True)) == [11, 11, 21], "no slice 0"
    assert _origin(flair_only(tmp_path / "CASE" / "CASE_3.png", color=True)) == [21, 31, 31], "no slice 4"


def test_gray_reads_and_uploads_are_left_alone(tmp_path):
    _series(tmp_path / "CASE", 2)
    read = context.with_context(read_slice, "all")
    assert read(tmp_path / "CASE" / "CASE_1.png").ndim == 2
    upload = (tmp_path / "CASE" / "CASE_1.png").read_bytes()
    assert read(upload, color=True).shape == (8, 8, 3)
