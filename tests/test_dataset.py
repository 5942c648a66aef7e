import numpy as np
import pytest


def test_batch_augmentation_keeps_shape_and_range_and_differs_per_sample():
    import torch

    from components.dataset import augment_batch

    torch.manual_seed(0)
    square = torch.zeros(16, 3, 32, 32)
    square[:, :, 8:24, 8:24] = 0.5
    out = augment_batch(square)
    assert out.shape == square.shape and out.dtype == square.dtype and torch.isfinite(out).all()
    assert out.min() > -0.2 and out.max() < 1.2
    moved = [(out[i] - square[i]).abs().mean().item() for i in range(16)]
    assert len({round(m, 4) for m in moved}) > 8, "each sample gets its own pose, flip and contrast"
    assert 0.35 < out.mean().item() / square.mean().item() < 1.6, "content stays in the frame"


@pytest.mark.parametrize("channels", [1, 3])
def test_prepared_images_are_cached_per_input_size_and_channels(tmp_path, channels):
    import pandas as pd
    from PIL import Image

    from components.dataset import prepared_images

    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "path": paths})
    first = prepared_images(frame, 24, tmp_path / "cache", channels=channels)
    assert first.shape == (3, channels, 24, 24)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    np.testing.assert_array_equal(first, prepared_images(frame, 24, tmp_path / "cache", channels=channels))
