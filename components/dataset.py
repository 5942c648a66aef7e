"""Prepared images in memory, with an on-disk cache keyed on the files and the input size.

2D slice sets fit in memory at training resolution (5,700 slices at 224 px are
1.1 GB as float32), and reading + resizing them is the slow part of a rerun,
so a rerun with other training params reuses the prepared array.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from components.imaging import code_version, file_signature, model_input, read_slice

CACHE_DIR = Path("data/cache")


def _cache_key(frame: pd.DataFrame, image_size: int, channels: int) -> str:
    """Files (path, size, modification time), input size and channels and the preparing code, hashed."""
    digest = hashlib.sha256(f"{image_size}:{channels}:{code_version()}".encode())
    for image_id, path in zip(frame["image_id"], frame["path"]):
        digest.update(f"{image_id}:{file_signature(path)}".encode())
    return digest.hexdigest()[:20]


def prepared_images(frame: pd.DataFrame, image_size: int, cache_dir: Path = CACHE_DIR, channels: int = 1) -> np.ndarray:
    """(N, channels, S, S) float32 model input for every manifest row, from cache when possible."""
    cache = cache_dir / f"{_cache_key(frame, image_size, channels)}.npy"
    if cache.exists():
        return np.load(cache)
    # errors name the image by its pseudonym: source paths can carry patient IDs
    images = (read_slice(path, name=image_id, color=channels > 1) for path, image_id in zip(frame["path"], frame["image_id"]))
    array = np.stack([model_input(image, image_size, channels) for image in images])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def prepared_masks(frame: pd.DataFrame, image_size: int, cache_dir: Path = CACHE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, S, S) float16 lesion area per pixel at the model's input size (the images are only resized, so the
    mask stays aligned), and whether each row has a mask at all; from cache when possible."""
    paths = frame["mask_path"].fillna("").astype(str) if "mask_path" in frame else pd.Series([""] * len(frame))
    has_mask = (paths != "").to_numpy()
    keyed = frame.assign(path=np.where(has_mask, paths, "no-mask"))
    cache = cache_dir / f"masks-{_cache_key(keyed, image_size, 1)}.npy"
    if not cache.exists():
        masks = np.zeros((len(frame), 1, image_size, image_size), np.float16)
        for row, (path, image_id) in enumerate(zip(paths, frame["image_id"])):
            if path:
                masks[row, 0] = _mask_area(read_slice(path, name=f"{image_id} (mask)"), image_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, masks)
    return np.load(cache), has_mask


def _mask_area(mask: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize((mask > 0.5).astype(np.float32), (size, size), order=1, anti_aliasing=True)


def drop_sequences(images, probability: float):
    """With ``probability`` per slice, each channel is replaced (with chance 1/2) by a copy of one randomly chosen
    channel: how multi-sequence sets fill a missing sequence (LGG copies FLAIR into a missing T1 or T1c). A network
    that never saw such slices missed every tumour of the LGG patients whose sequences were all FLAIR."""
    import torch

    n, channels = images.shape[:2]
    if channels == 1 or probability <= 0:
        return images
    device = images.device
    source = images[torch.arange(n, device=device), torch.randint(channels, (n,), device=device)]
    replaced = (torch.rand(n, 1, device=device) < probability) & (torch.rand(n, channels, device=device) < 0.5)
    return torch.where(replaced[:, :, None, None], source[:, None], images)


def jitter_intensities(images, probability: float):
    """With ``probability`` per slice, each channel gets its own gamma and a smooth multiplicative bias field:
    patients differ by scanner and protocol in how each sequence renders tissue, and with a few dozen training
    patients a network learns those renderings instead of the lesions (per-image normalisation removes only
    the global range). MONAI's RandAdjustContrast and RandBiasField do this per sample; batched, for the reason
    ``augment_batch`` gives."""
    import torch
    import torch.nn.functional as F

    if probability <= 0:
        return images
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    device = images.device
    chosen = torch.rand(n, 1, 1, 1, device=device) < probability
    gamma = torch.exp((torch.rand(n, channels, 1, 1, device=device) * 2 - 1) * 0.4)  # γ in (0.67, 1.5)
    coarse = (torch.rand(n, channels, 3, 3, device=device) * 2 - 1) * 0.3
    field = torch.exp(F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True))  # ×(0.74, 1.35)
    jittered = (images.clamp_min(0) ** gamma.to(images.dtype) * field.to(images.dtype)).clamp(0, 1)
    return torch.where(chosen, jittered, images)


def at_size(images, size: int):
    """A (N, C, S, S) batch resized to ``size`` (antialiased bilinear, so small sizes keep no aliasing); as it is at
    its own size."""
    import torch.nn.functional as F

    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def augment_batch(images, masks=None):
    """Random pose, flip, contrast and noise for a whole (N, C, S, S) batch in a few tensor ops, the same
    distribution MONAI's per-sample RandAffine/RandFlip/RandAdjustContrast/RandGaussianNoise gave: on 2 cores
    those per-sample transforms took longer than the network's own step. ``masks`` (N, 1, S, S) take the same
    pose and flip; given them, the result is (images, masks)."""
    import torch
    import torch.nn.functional as F

    n, device = images.shape[0], images.device
    theta = random_pose(n, images.shape[-1], device)

    def sample(planes):  # images and masks alike, each at its own size
        grid = affine_grid(theta.to(planes.dtype), planes.shape[-2:])
        return F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    out = sample(images).clamp_min(0)
    contrasted = torch.nonzero(torch.rand(n, device=device) < 0.3).flatten()  # γ in (0.8, 1.25) for these
    out[contrasted] = out[contrasted] ** torch.exp((torch.rand(len(contrasted), device=device) * 2 - 1) * 0.223).view(-1, 1, 1, 1).to(
        out.dtype
    )
    noisy = torch.nonzero(torch.rand(n, device=device) < 0.3).flatten()  # noise drawn for these only: most of the op's cost
    out[noisy] = out[noisy] + torch.randn_like(out[noisy]) * 0.02
    return out if masks is None else (out, sample(masks))


def random_pose(n: int, size: int, device=None):
    """(n, 2, 3) affine matrices for ``augment_batch``: 80 % of slices rotated up to ±0.3 rad, scaled ±12 % and
    shifted up to ±6 px of a ``size``-pixel input, and half of all slices mirrored left-right."""
    import torch

    uniform = lambda *shape: torch.rand(*shape, device=device) * 2 - 1  # noqa: E731
    posed = torch.rand(n, device=device) < 0.8
    angle = torch.where(posed, uniform(n) * 0.3, 0.0)
    scale = torch.where(posed, 1 + uniform(n) * 0.12, 1.0)
    shift = torch.where(posed[:, None], uniform(n, 2) * 12 / size, 0.0)
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)


def affine_grid(theta, size: tuple[int, int]):
    """``F.affine_grid(theta, (N, C, *size), align_corners=False)`` as two broadcast planes: torch builds it
    as a batched matrix product over every pixel, 5x the cost of the sampling itself on 2 cores."""
    import torch

    height, width = size
    x = ((torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1).view(1, 1, width)
    y = ((torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1).view(1, height, 1)
    rows = [theta[:, k, 0, None, None] * x + theta[:, k, 1, None, None] * y + theta[:, k, 2, None, None] for k in (0, 1)]
    return torch.stack(rows, -1)


class SliceDataset:
    """Index → (image tensor, label), or (image, label, mask, has mask) given masks; augmentation happens per
    batch (``augment_batch``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, masks: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        import torch

        item = (torch.from_numpy(self.images[index]), int(self.labels[index]))
        if self.masks is None:
            return item
        masks, has_mask = self.masks
        return *item, torch.from_numpy(masks[index].astype(np.float32)), bool(has_mask[index])


class UnmaskedSlices(SliceDataset):
    """Slices of a set without masks trained beside one with them (co-training): an empty mask marked absent, so
    that the lesion map's loss leaves them out and batches keep one shape."""

    def __getitem__(self, index: int):
        import torch

        image, label = super().__getitem__(index)
        return image, label, torch.zeros((1, *image.shape[1:])), False


class MixedEpochs:
    """A sampler over [own rows, extra rows]: each epoch every own row once and ``drawn`` extra rows, shuffled
    together. The extra rows are drawn without replacement across epochs (a fresh permutation once all were drawn),
    so that a share of a large set covers all of it over a run; the draws follow torch's seeded generator."""

    def __init__(self, own: int, extra: int, drawn: int) -> None:
        self.own, self.extra, self.drawn = own, extra, drawn if extra else 0
        self._queue: list[int] = []

    def __len__(self) -> int:
        return self.own + self.drawn

    def __iter__(self):
        import torch

        while len(self._queue) < self.drawn:
            self._queue += (torch.randperm(self.extra) + self.own).tolist()
        drawn, self._queue = self._queue[: self.drawn], self._queue[self.drawn :]
        epoch = torch.tensor(list(range(self.own)) + drawn, dtype=torch.long)
        return iter(epoch[torch.randperm(len(epoch))].tolist())
