from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.errors import DataError
from components.imaging import prepare, read_slice, slice_stats


def test_reads_png_and_rgb_jpeg_as_unit_gray(tmp_path: Path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=95)
    png, jpg = read_slice(tmp_path / "g.png"), read_slice(tmp_path / "c.jpg")
    assert png.shape == jpg.shape == (64, 64)
    assert png.min() == 0 and png.max() == pytest.approx(252 / 255)
    assert np.abs(png - jpg).mean() < 0.02


def test_corrupt_file_error_names_the_file(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as error:
        read_slice(broken)
    assert str(broken) in str(error.value) and "not a readable image" in str(error.value)


def test_a_slice_larger_than_any_mri_is_refused_before_decoding(tmp_path: Path):
    from tests.endpoint import blank_png_bytes

    for name, (width, height) in {"bomb.png": (14_000, 14_000), "wide.png": (5_000, 8)}.items():
        (tmp_path / name).write_bytes(blank_png_bytes(width, height))
        with pytest.raises(DataError, match=f"{name}: .*(larger than|more pixels than) any MRI slice"):
            read_slice(tmp_path / name)
    (tmp_path / "big.png").write_bytes(blank_png_bytes(4096, 16))
    assert read_slice(tmp_path / "big.png").shape == (16, 4096)


def test_missing_file_error(tmp_path: Path):
    with pytest.raises(DataError, match="file not found"):
        read_slice(tmp_path / "nope.png")


def test_prepare_resizes_and_is_gain_invariant():
    rng = np.random.default_rng(0)
    image = rng.random((100, 80)).astype(np.float32) * 0.5
    a, b = prepare(image, 32), prepare(image * 1.7, 32)
    assert a.shape == (32, 32) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_stats_are_raw_intensity():
    image = np.full((10, 20), 0.25, dtype=np.float32)
    stats = slice_stats(image)
    assert stats["width"] == 20 and stats["height"] == 10
    assert stats["mean"] == pytest.approx(0.25) and stats["std"] == pytest.approx(0.0)


def test_palette_and_16_bit_images_are_read_by_their_type(tmp_path: Path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    np.testing.assert_allclose(read_slice(tmp_path / "p.png"), gray / 255, atol=0.02)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    np.testing.assert_allclose(read_slice(tmp_path / "sixteen.png"), gray / 255, atol=1e-3)


def test_colour_slices_keep_their_sequences_and_each_channel_is_normalised_alone(tmp_path: Path):
    from components.imaging import model_input

    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    rgb = np.stack([ramp, ramp // 4, 255 - ramp], axis=-1)  # three sequences with different ranges
    Image.fromarray(rgb).save(tmp_path / "seq.png")
    colour = read_slice(tmp_path / "seq.png", color=True)
    assert colour.shape == (64, 64, 3) and read_slice(tmp_path / "seq.png").shape == (64, 64)
    planes = model_input(colour, 32, channels=3)
    assert planes.shape == (3, 32, 32)
    for plane in planes:  # the dim second sequence is stretched to the full range like the others
        assert plane.max() == pytest.approx(1.0) and plane.min() == pytest.approx(0.0)
    assert np.allclose(planes[2], planes[0][:, ::-1], atol=0.05), "the inverted ramp stays inverted"


def test_model_input_adapts_gray_and_colour_to_the_network_channels():
    from components.imaging import model_input

    gray = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    repeated = model_input(gray, 16, channels=3)
    assert repeated.shape == (3, 16, 16) and np.array_equal(repeated[0], repeated[2])
    colour = np.stack([gray, gray * 0.5, gray], axis=-1)
    assert model_input(colour, 16, channels=1).shape == (1, 16, 16)
    np.testing.assert_allclose(model_input(colour, 16, channels=1)[0], prepare(colour.mean(-1), 16), atol=1e-6)
