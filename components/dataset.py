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


def augment_batch(images):
    """Random pose, flip, contrast and noise for a whole (N, C, S, S) batch in a few tensor ops, the same
    distribution MONAI's per-sample RandAffine/RandFlip/RandAdjustContrast/RandGaussianNoise gave: on 2 cores
    those per-sample transforms took longer than the network's own step."""
    import torch
    import torch.nn.functional as F

    n, device = images.shape[0], images.device
    uniform = lambda *shape: torch.rand(*shape, device=device) * 2 - 1  # noqa: E731
    posed = torch.rand(n, device=device) < 0.8
    angle = torch.where(posed, uniform(n) * 0.3, 0.0)
    scale = torch.where(posed, 1 + uniform(n) * 0.12, 1.0)
    shift = torch.where(posed[:, None], uniform(n, 2) * 12 / images.shape[-1], 0.0)  # ±6 px of the input
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_min(0)
    gamma = torch.where(torch.rand(n, device=device) < 0.3, torch.exp(uniform(n) * 0.223), 1.0)  # γ in (0.8, 1.25)
    out = out ** gamma.view(n, 1, 1, 1).to(out.dtype)
    noisy = (torch.rand(n, device=device) < 0.3).view(n, 1, 1, 1)
    return out + noisy * torch.randn_like(out) * 0.02


class SliceDataset:
    """Index → (image tensor, label); augmentation happens per batch (``augment_batch``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        import torch

        return torch.from_numpy(self.images[index]), int(self.labels[index])
