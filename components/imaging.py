"""Reading slices and turning them into model input, shared by training and serving.

Training and the endpoint call the very same functions, so a served image is
prepared exactly as the images the model learnt from.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
STAT_COLUMNS = ("width", "height", "mean", "std", "p01", "p50", "p99", "foreground")
# Far above any MRI slice (256-1024 px a side). A larger header is refused before decoding: a 190 KB PNG can
# declare 14,000 x 14,000 pixels, gigabytes once decoded and scaled (a decompression bomb).
MAX_SLICE_SIDE = 4096


def refuse_oversized(name: str, width: int, height: int) -> None:
    """Checked from the header, before decoding: compressed pixel data can declare gigabytes."""
    if max(width, height) > MAX_SLICE_SIDE:
        raise DataError(name, f"{width} x {height} pixels: larger than any MRI slice (at most {MAX_SLICE_SIDE} a side); not decoded")


def read_slice(source: str | Path | bytes, name: str | None = None, color: bool = False) -> np.ndarray:
    """A 2D grayscale slice scaled to [0, 1]; colour images are averaged over channels unless ``color``
    asks for (H, W, 3): multi-sequence slices (LGG's T1, FLAIR, T1c) carry one sequence per channel.

    ``source`` is a path or the raw bytes of an upload; ``name`` names it in errors.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as image:
            refuse_oversized(label, image.width, image.height)
            image.load()
            if image.mode not in ("L", "RGB", "I;16", "I;16B", "I", "F"):  # palette, alpha, CMYK: read as gray
                image = image.convert("L")
            array = np.asarray(image)
    except FileNotFoundError:
        raise DataError(label, "file not found") from None
    except Image.DecompressionBombError:  # PIL's own guard, raised on opening, before the size check above
        raise DataError(label, f"declares more pixels than any MRI slice (at most {MAX_SLICE_SIDE} a side); not decoded") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(label, f"not a readable image ({exc.__class__.__name__})") from None
    return _to_unit(array, label, color)


def _to_unit(array: np.ndarray, label: str, color: bool = False) -> np.ndarray:
    # the full range of the stored type, not of this image, so slices of one series stay comparable
    top = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    if array.ndim == 3:
        array = array[..., :3] if color and array.shape[-1] >= 3 else array[..., :3].mean(axis=-1)
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 2:
        raise DataError(label, f"expected a 2D image, got shape {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(label, "image holds NaN or infinite values")
    return np.clip(array / top, 0.0, 1.0)


def gray(image: np.ndarray) -> np.ndarray:
    """One plane of a slice read in colour (H, W, 3): the channel mean, as ``read_slice`` gives by default."""
    return image.mean(axis=-1) if image.ndim == 3 else image


def slice_stats(image: np.ndarray) -> dict[str, float]:
    """Raw-intensity statistics: what QC gates and drift monitoring compare."""
    image = gray(image)
    p01, p50, p99 = np.percentile(image, [1, 50, 99])
    return {
        "width": float(image.shape[1]),
        "height": float(image.shape[0]),
        "mean": float(image.mean()),
        "std": float(image.std()),
        "p01": float(p01),
        "p50": float(p50),
        "p99": float(p99),
        "foreground": float((image > 0.05).mean()),
    }


def prepare(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``² and normalise per image (robust percentiles), so scanner gain does not matter."""
    from skimage.transform import resize

    resized = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    low, high = np.percentile(resized, [0.5, 99.5])
    if high - low < 1e-6:
        return np.zeros_like(resized)
    return np.clip((resized - low) / (high - low), 0.0, 1.0).astype(np.float32)


def model_input(image: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """(channels, size, size) network input from a slice read in gray or colour: each channel is prepared on
    its own (per-image, per-channel normalisation: LGG's sequences differ in range), a gray slice is repeated
    for a 3-channel model and a colour one averaged for a 1-channel model."""
    planes = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
    if channels == 1 and len(planes) > 1:
        planes = planes.mean(axis=0, keepdims=True)
    elif len(planes) == 1 and channels > 1:
        planes = np.repeat(planes, channels, axis=0)
    return np.stack([prepare(plane, size) for plane in planes])


def file_signature(path: Path | str) -> str:
    """Path, size and modification time: how every cache tells an unchanged file without reading it."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


@cache
def code_version(*modules: str) -> str:
    """A short hash of these modules' source: caches of derived pixels are void once the code changes
    (computed once per process: the volume path asks for it per case)."""
    import importlib
    import inspect

    digest = hashlib.sha256()
    for module in ("components.imaging", *modules):
        digest.update(inspect.getsource(importlib.import_module(module)).encode())
    return digest.hexdigest()[:12]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def portable_path(path: Path, root: Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the workspace, where stages run) when it lies inside, else absolute:
    DVC hashes what stages write, and that must not depend on where a clone sits."""
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root or Path.cwd()))  # abspath: symlinked folders keep their names
    return str(absolute.relative_to(base)) if absolute.is_relative_to(base) else str(absolute)
