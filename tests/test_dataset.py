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


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_affine_grid_is_torchs(size):
    import torch
    import torch.nn.functional as F

    from components.dataset import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [5, 1, *size], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, size), expected, atol=1e-5, rtol=0)


def test_contrast_and_noise_reach_about_three_in_ten_slices():
    import torch

    from components.dataset import augment_batch

    torch.manual_seed(2)
    flat = torch.full((3000, 1, 64, 64), 0.5)
    centre = augment_batch(flat)[:, 0, 24:40, 24:40]  # inside the frame whatever the pose
    noisy = (centre.std(dim=(1, 2)) > 0.01).float().mean().item()
    contrasted = ((centre.mean(dim=(1, 2)) - 0.5).abs() > 0.005).float().mean().item()
    assert 0.26 < noisy < 0.34
    assert 0.24 < contrasted < 0.32  # γ within 1.5 % of 1 moves the level less: ~93 % of the 30 % show


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


def test_masks_take_the_same_pose_and_flip_as_their_images():
    import torch

    from components.dataset import augment_batch

    torch.manual_seed(1)
    masks = torch.zeros(16, 1, 32, 32)
    for i in range(16):
        masks[i, :, 4 + i : 12 + i, 6:14] = 1.0  # a lesion in a different place per slice
    images, moved_masks = augment_batch(masks.repeat(1, 3, 1, 1) * 0.8, masks)
    assert moved_masks.shape == masks.shape
    assert not torch.allclose(moved_masks, masks), "the masks were posed too"
    for i in range(16):  # the lesion's pixels in the image are where the mask says, whatever the pose
        inside = moved_masks[i, 0] > 0.5
        assert images[i, 1][inside].mean() > 3 * images[i, 1][~inside].mean()


def test_prepared_masks_are_aligned_area_maps_and_say_which_rows_have_one(tmp_path):
    import pandas as pd
    from PIL import Image

    from components.dataset import prepared_masks

    mask = np.zeros((40, 40), np.uint8)
    mask[:20, :10] = 255  # top-left eighth of the slice
    Image.fromarray(mask).save(tmp_path / "m.png")
    frame = pd.DataFrame({"image_id": ["a", "b"], "path": ["x", "y"], "mask_path": [str(tmp_path / "m.png"), None]})
    masks, has_mask = prepared_masks(frame, 20, tmp_path / "cache")
    assert masks.shape == (2, 1, 20, 20) and has_mask.tolist() == [True, False]
    assert masks[0, 0, :8, :3].min() > 0.99 and masks[0, 0, 12:, 7:].max() == 0
    assert abs(float(masks[0].mean()) - 1 / 8) < 0.02 and masks[1].max() == 0
    np.testing.assert_array_equal(masks, prepared_masks(frame, 20, tmp_path / "cache")[0])


def test_a_missing_mask_file_is_named_by_its_slices_pseudonym(tmp_path):
    import pandas as pd

    from components.dataset import prepared_masks
    from components.errors import DataError

    frame = pd.DataFrame({"image_id": ["slice-7"], "path": ["x"], "mask_path": [str(tmp_path / "patient-name_mask.tif")]})
    with pytest.raises(DataError) as error:
        prepared_masks(frame, 20, tmp_path / "cache")
    assert "slice-7 (mask)" in str(error.value) and "patient-name" not in str(error.value)


def test_dropped_sequences_are_copies_of_one_sequence_of_the_same_slice():
    import torch

    from components.dataset import drop_sequences

    torch.manual_seed(0)
    images = torch.rand(200, 3, 8, 8)
    gray = images[:, :1]
    assert drop_sequences(images, 0.0) is images and drop_sequences(gray, 1.0) is gray
    out = drop_sequences(images, 1.0)
    changed = 0
    for original, new in zip(images, out):
        copied = [k for k in range(3) if not torch.equal(new[k], original[k])]
        if copied:
            source = new[copied[0]]
            assert all(torch.equal(new[k], source) for k in copied), "one source per slice"
            assert any(torch.equal(source, original[c]) for c in range(3)), "the source is one of the slice's own sequences"
        changed += bool(copied)
    assert 100 < changed < 200, "each channel is replaced with chance 1/2 (a copy of itself is no change)"
    assert (drop_sequences(images, 0.3) != images).flatten(1).any(1).float().mean() < 0.3


def test_intensity_jitter_changes_each_sequence_smoothly_and_keeps_the_range():
    import torch

    from components.dataset import jitter_intensities

    torch.manual_seed(0)
    flat = torch.full((300, 3, 32, 32), 0.5)
    assert jitter_intensities(flat, 0.0) is flat
    out = jitter_intensities(flat, 1.0)
    assert out.min() >= 0 and out.max() <= 1
    assert (out != flat).flatten(1).any(1).all(), "every slice is jittered at probability 1"
    per_channel_mean = out.mean(dim=(2, 3))
    assert (per_channel_mean[:, 0] - per_channel_mean[:, 1]).abs().mean() > 0.03, "each sequence gets its own contrast"
    neighbour_step = (out[..., 1:] - out[..., :-1]).abs().max()
    assert neighbour_step < 0.05, "the bias field is smooth, not noise"
    assert 0.35 < (jitter_intensities(flat, 0.5) != flat).flatten(1).any(1).float().mean() < 0.65
