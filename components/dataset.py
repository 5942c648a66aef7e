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

from components.imaging import code_version, file_signature, prepare, read_slice

CACHE_DIR = Path("data/cache")


def _cache_key(frame: pd.DataFrame, image_size: int) -> str:
    """Files (path, size, modification time), input size and the preparing code, hashed."""
    digest = hashlib.sha256(f"{image_size}:{code_version()}".encode())
    for image_id, path in zip(frame["image_id"], frame["path"]):
        digest.update(f"{image_id}:{file_signature(path)}".encode())
    return digest.hexdigest()[:20]


def prepared_images(frame: pd.DataFrame, image_size: int, cache_dir: Path = CACHE_DIR) -> np.ndarray:
    """(N, 1, S, S) float32 model input for every manifest row, from cache when possible."""
    cache = cache_dir / f"{_cache_key(frame, image_size)}.npy"
    if cache.exists():
        return np.load(cache)
    # errors name the image by its pseudonym: source paths can carry patient IDs
    images = (read_slice(path, name=image_id) for path, image_id in zip(frame["path"], frame["image_id"]))
    array = np.stack([prepare(image, image_size) for image in images])[:, None]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def augmentations():
    """MONAI random transforms for one (1, S, S) sample: pose, flip, contrast, noise."""
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise

    return Compose(
        [
            RandAffine(prob=0.8, rotate_range=0.3, scale_range=0.12, translate_range=(6, 6), padding_mode="zeros"),
            RandFlip(prob=0.5, spatial_axis=1),
            RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
            RandGaussianNoise(prob=0.3, std=0.02),
        ]
    )


class SliceDataset:
    """Index → (image tensor, label); transforms run per sample, metadata tracking off for speed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        import torch

        image = torch.from_numpy(self.images[index])
        if self.transform is not None:
            image = torch.as_tensor(self.transform(image)).float()
        return image, int(self.labels[index])
