"""A synthetic cohort of brain MRI slices with known tumours: the default data set.

Built from real anatomy (the MNI152 T1 template that ships inside nilearn, so no
download), varied per subject by a smooth deformation, intensity curve, bias field,
noise and resolution of one of several scanner profiles. Positive subjects carry a
tumour-like lesion (necrotic core, enhancing rim, oedema) of known size and mask.
Every image also holds small bright vessel-like spots, so "a bright blob" alone
does not tell the classes apart, and lesions go down to a few millimetres.

``shift`` produces the drifted cohorts the monitoring loop must notice: another
scanner profile, another prevalence, or smaller lesions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import ndimage

from components.config import NO_TUMOUR, SynthConfig, load_params
from components.stage import track

TUMOUR = "tumor"
FIELD_OF_VIEW_MM = 220.0


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner renders the same brain: gain, contrast curve, noise, blur, bias."""

    gain: float
    gamma: float
    noise: float
    blur_mm: float
    bias: float


SCANNERS = {
    "site-A": ScannerProfile(gain=0.85, gamma=1.0, noise=0.025, blur_mm=1.0, bias=0.15),
    "site-B": ScannerProfile(gain=0.75, gamma=0.9, noise=0.035, blur_mm=1.5, bias=0.20),
    "site-C": ScannerProfile(gain=0.95, gamma=1.1, noise=0.020, blur_mm=0.8, bias=0.10),
}
SHIFTED_SCANNER = {"site-D": ScannerProfile(gain=0.55, gamma=1.45, noise=0.07, blur_mm=2.5, bias=0.35)}


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm MNI152 T1 template and brain mask, axial slices last, anterior up, as radiologists view them."""
    from nilearn import datasets

    def radiological(image) -> np.ndarray:
        return np.asarray(image.dataobj).transpose(1, 0, 2)[::-1]

    template = radiological(datasets.load_mni152_template(resolution=1)).astype(np.float32)
    mask = radiological(datasets.load_mni152_brain_mask(resolution=1)) > 0
    return template, mask


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth random field in [-1, 1]: warps, bias fields and irregular lesion borders."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-8)


def _sampling_grid(rng: np.random.Generator, size: int, template_shape: tuple[int, ...]) -> np.ndarray:
    """Output voxel -> template coordinates (2D or 3D): in-plane rotation, scale, shift and elastic warp."""
    ndim = len(template_shape)
    mm_per_pixel = FIELD_OF_VIEW_MM / size
    centred = np.indices((size,) * ndim, dtype=np.float32) - size / 2
    angle = rng.uniform(-0.35, 0.35)
    cos, sin = np.cos(angle), np.sin(angle)
    coords = centred.copy()
    coords[0], coords[1] = cos * centred[0] - sin * centred[1], sin * centred[0] + cos * centred[1]
    scale = rng.uniform(0.82, 1.18, size=ndim)
    warp_mm = rng.uniform(3.0, 9.0)
    for axis in range(ndim):
        coords[axis] *= scale[axis] * mm_per_pixel
        coords[axis] += _smooth_field(rng, (size,) * ndim, size / 6) * warp_mm + rng.uniform(-10, 10)
        coords[axis] += template_shape[axis] / 2
    return coords


def _lesion_maps(rng: np.random.Generator, brain: np.ndarray, diameter_px: float) -> tuple[np.ndarray, ...]:
    """Core, rim and oedema weights (0..1) of one irregular lesion placed inside the brain (2D or 3D)."""
    inner = ndimage.binary_erosion(brain, iterations=max(2, int(diameter_px / 2)))
    candidates = np.argwhere(inner if inner.any() else brain)
    centre = candidates[rng.integers(len(candidates))]
    offsets = np.indices(brain.shape, dtype=np.float32) - centre.reshape(-1, *([1] * brain.ndim))
    axes = diameter_px / 2 * rng.uniform(0.75, 1.25, size=brain.ndim)
    angle = rng.uniform(0, np.pi)
    rotated = offsets.copy()
    rotated[0] = np.cos(angle) * offsets[0] + np.sin(angle) * offsets[1]
    rotated[1] = -np.sin(angle) * offsets[0] + np.cos(angle) * offsets[1]
    distance = np.sqrt(sum((rotated[axis] / axes[axis]) ** 2 for axis in range(brain.ndim)))
    radius = distance * (1 + 0.25 * _smooth_field(rng, brain.shape, max(diameter_px / 3, 1.5)))
    lesion = np.clip(1.0 - (radius - 1.0) * 4, 0, 1)
    core = np.clip(1.0 - (radius - rng.uniform(0.3, 0.7)) * 6, 0, 1)
    oedema = np.clip(1.0 - (radius - rng.uniform(1.4, 2.2)) * 2, 0, 1) * brain
    return core, np.clip(lesion - core, 0, 1), np.clip(oedema - lesion, 0, 1), lesion > 0.5


def _vessel_spots(rng: np.random.Generator, brain: np.ndarray) -> np.ndarray:
    """Small bright dots (vessels, choroid plexus) in every image: tumour look-alikes."""
    spots = np.zeros(brain.shape, dtype=np.float32)
    inside = np.argwhere(brain)
    for _ in range(rng.integers(1, 5) * (1 if brain.ndim == 2 else 8)):
        spots[tuple(inside[rng.integers(len(inside))])] = rng.uniform(0.5, 1.0)
    return np.clip(ndimage.gaussian_filter(spots, rng.uniform(0.7, 1.6)) * 12 ** (brain.ndim / 2), 0, 0.6)


def _anatomy(rng: np.random.Generator, template: np.ndarray, brain_mask: np.ndarray, size: int, lesion_mm: float | None):
    """Deformed anatomy with vessels and, if asked, a lesion: (intensities, lesion mask)."""
    grid = _sampling_grid(rng, size, template.shape)
    anatomy = ndimage.map_coordinates(template, grid, order=1)
    brain = ndimage.map_coordinates(brain_mask.astype(np.float32), grid, order=1) > 0.5
    anatomy = anatomy * rng.uniform(0.9, 1.1) + _vessel_spots(rng, brain) * brain
    mask = np.zeros(anatomy.shape, dtype=bool)
    if lesion_mm is not None and brain.sum() > 50:
        core, rim, oedema, mask = _lesion_maps(rng, brain, lesion_mm * size / FIELD_OF_VIEW_MM)
        contrast = rng.uniform(0.6, 1.0)
        tissue = np.where(brain, anatomy, 0)
        anatomy = tissue * (1 - contrast * (0.25 * oedema + 0.5 * core)) + contrast * rim * rng.uniform(0.5, 0.9) + (1 - brain) * anatomy
    return anatomy, mask


def render_slice(
    rng: np.random.Generator, z: int, size: int, scanner: ScannerProfile, lesion_mm: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """One 8-bit axial slice and its lesion mask (empty for a tumour-free slice)."""
    template, brain_mask = _template()
    anatomy, mask = _anatomy(rng, template[:, :, z], brain_mask[:, :, z], size, lesion_mm)
    return _scan(rng, anatomy, scanner, size), mask


def render_volume(rng: np.random.Generator, size: int, scanner: ScannerProfile, lesion_mm: float | None) -> tuple[np.ndarray, np.ndarray]:
    """One 8-bit 3D volume (size³ voxels over the field of view) and its lesion mask."""
    template, brain_mask = _template()
    anatomy, mask = _anatomy(rng, template, brain_mask, size, lesion_mm)
    return _scan(rng, anatomy, scanner, size), mask


def _scan(rng: np.random.Generator, anatomy: np.ndarray, scanner: ScannerProfile, size: int) -> np.ndarray:
    """What the scanner makes of the anatomy: blur, contrast curve, bias field, gain and Rician noise."""
    blur_px = scanner.blur_mm * rng.uniform(0.7, 1.3) * size / FIELD_OF_VIEW_MM
    image = ndimage.gaussian_filter(anatomy, blur_px)
    image = np.clip(image, 0, None) ** (scanner.gamma * rng.uniform(0.9, 1.1))
    image *= 1 + scanner.bias * _smooth_field(rng, image.shape, size / 4)
    image *= scanner.gain * rng.uniform(0.9, 1.1)
    noise = scanner.noise * rng.uniform(0.8, 1.2)
    image = np.hypot(image + rng.normal(0, noise, image.shape), rng.normal(0, noise, image.shape))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _cohort_design(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Subjects with demographics, scanner and lesion size; the shift knob changes the mix."""
    scanners = SHIFTED_SCANNER if config.shift == "scanner" else SCANNERS
    prevalence = 0.85 if config.shift == "prevalence" else config.prevalence
    n = config.subjects
    has_tumour = rng.random(n) < prevalence
    has_tumour[:2] = [True, False]  # both classes even in the tiniest cohort
    lesion_mm = np.exp(rng.uniform(np.log(10), np.log(60), n))
    if config.shift == "lesion_size":
        lesion_mm = np.exp(rng.uniform(np.log(4), np.log(12), n))
    offset = config.seed * 100_000
    return pd.DataFrame(
        {
            "subject_id": [f"SYN-{offset + i:07d}" for i in range(n)],
            "age": np.clip(rng.normal(56, 15, n), 18, 90).round().astype(int),
            "sex": rng.choice(["F", "M"], n),
            "site": rng.choice(sorted(scanners), n),
            "has_tumour": has_tumour,
            "lesion_mm": np.where(has_tumour, lesion_mm.round(1), np.nan),
        }
    )


def run(config: SynthConfig, progress: bool = False) -> pd.DataFrame:
    """Write ``<out>/<label>/<name>.png``, masks under ``<out>/masks/`` and ``<out>/metadata.csv``."""
    rng = np.random.default_rng(config.seed)
    design = _cohort_design(config, rng)
    scanners = {**SCANNERS, **SHIFTED_SCANNER}
    for folder in (NO_TUMOUR, TUMOUR, "masks"):
        (config.out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in track(design.itertuples(index=False), progress, "synthesising subjects", total=len(design)):
        first_z = int(rng.integers(55, 115))
        for k in range(config.slices_per_subject):
            rows.append(_write_slice(config, rng, subject, first_z + 5 * k, k, scanners[subject.site]))
    metadata = pd.DataFrame(rows)
    metadata.to_csv(config.out / "metadata.csv", index=False)
    if config.volumes:
        volumes = [_write_volume(config, rng, subject, scanners[subject.site]) for subject in design.itertuples(index=False)]
        pd.DataFrame(volumes).to_csv(config.out / "volumes" / "metadata.csv", index=False)
    return metadata


def _write_volume(config: SynthConfig, rng: np.random.Generator, subject, scanner: ScannerProfile) -> dict:
    """A NIfTI volume (isotropic voxels over the field of view, RAS-like affine) and its lesion mask."""
    import nibabel as nib

    volume, mask = render_volume(rng, config.volume_size, scanner, subject.lesion_mm if subject.has_tumour else None)
    label = TUMOUR if mask.any() else NO_TUMOUR
    spacing = FIELD_OF_VIEW_MM / config.volume_size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    name = f"{subject.subject_id.lower()}.nii.gz"
    for folder, data in ((label, volume), ("masks", mask.astype(np.uint8))):
        (config.out / "volumes" / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), config.out / "volumes" / folder / name)
    return {"file": f"{label}/{name}", "mask": f"masks/{name}", "subject_id": subject.subject_id, "site": subject.site}


def _write_slice(config: SynthConfig, rng, subject, z: int, k: int, scanner: ScannerProfile) -> dict:
    from PIL import Image

    lesion_mm = subject.lesion_mm if subject.has_tumour else None
    image, mask = render_slice(rng, z, config.image_size, scanner, lesion_mm)
    label = TUMOUR if subject.has_tumour and mask.any() else NO_TUMOUR
    name = f"{subject.subject_id.lower()}-s{k}.png"
    Image.fromarray(image).save(config.out / label / name)
    Image.fromarray((mask * 255).astype(np.uint8)).save(config.out / "masks" / name)
    return {
        "file": f"{label}/{name}",
        "mask": f"masks/{name}",
        "subject_id": subject.subject_id,
        "age": subject.age,
        "sex": subject.sex,
        "site": subject.site,
        "lesion_mm": subject.lesion_mm if label == TUMOUR else None,
    }


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().synth, progress=sys.stdout.isatty()))


if __name__ == "__main__":
    main()
