"""Volumes: multi-sequence NIfTI subjects in, preprocessed volumes and labelled axial slices out.

Finding cases. Files are grouped by case name and sequence, read from BraTS-style
names (``<case>-t1c.nii.gz``, ``<case>_flair.nii.gz``, ``<case>_fla_bet.nii.gz``);
a file without a sequence token is one single-sequence case named by its stem.
Segmentations are files or folders named ``seg``/``mask(s)``/``label``/``fusion``; one
without a case name belongs to the only case in its top-level folder (the first, by
name, when there are several, e.g. ``fusion/mav`` before ``fusion/simple``).
A volume's label comes from ``labels.csv`` (``case,label``) at the root, else from a
class folder (``<root>/<label>/<case>...``), else from its segmentation.

Preprocessing (MONAI): sequences stacked as channels → RAS orientation →
resampling to ``spacing`` (linear; nearest for the segmentation) → optional rigid
registration to the MNI152 template (SimpleITK) → brain mask → crop to the brain
plus a margin → z-score per sequence inside the brain (zero outside).

Brain mask. Skull-stripped volumes (a zero background over > 30 % of voxels) use
their non-zero voxels. Otherwise a morphological extraction: Otsu threshold on the
mean of the sequences, erosion by 3 mm to cut the thin bridges between scalp and
brain, the largest connected component, dilation back by 3 mm, holes filled. It is
cruder than HD-BET or SynthStrip; run those upstream when exact brain boundaries matter.

Slices. Axial slices whose brain area is at least ``min_brain_fraction`` of the largest
slice's become images (RGB PNG of up to three sequences, anterior up, patient's right
on the image's left). With a segmentation a slice is ``tumor`` when its lesion covers at
least ``min_lesion_mm2`` and ``notumor`` when it has none; slices in between are
ambiguous and skipped. Without a segmentation, slices of a ``notumor`` volume are
``notumor``; slices of other volumes carry no slice label and are not emitted (the volume
still is, in ``volumes.csv``, for 3D use) unless ``slices_take_volume_label`` says the
label holds for every slice (key-image series, per-slice labelled exports).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.config import NO_TUMOUR, VolumeConfig
from components.errors import DataError
from components.imaging import file_signature

SEQUENCE_NAMES = {
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1pre": "t1",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "fla": "flair", "t2flair": "flair",
}  # fmt: skip
SEGMENTATION_WORDS = {"seg", "segmentation", "mask", "masks", "label", "labels", "fusion"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SINGLE_SEQUENCE = "image"
_SEQUENCE_PATTERN = re.compile(
    r"^(?P<case>.+?)[-_](?P<seq>" + "|".join(sorted(SEQUENCE_NAMES, key=len, reverse=True)) + r")(?:[-_.].*)?$", re.I
)
_SEGMENTATION_PATTERN = re.compile(r"^(?P<case>.+?)[-_](?:seg|segmentation|mask|label)(?:[-_.].*)?$", re.I)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
SKULL_STRIPPED_BACKGROUND = 0.3
BRAIN_MASK_MARGIN_MM = 3.0
# Beyond any brain MRI (a head spans < 300 mm; 512 x 512 x 512 voxels is a very fine scan). The header is checked
# before decoding: a few MB of gzip can declare gigabytes of voxels, or voxels 50 mm wide that resampling to
# 1 mm would multiply 125,000-fold.
MAX_VOLUME_VOXELS = 512**3
MAX_FIELD_OF_VIEW_MM = 400.0


@dataclass
class VolumeCase:
    """One subject's co-registered sequences, as named on disk (names never leave ingestion)."""

    case: str
    sequences: dict[str, Path] = field(default_factory=dict)
    segmentation: Path | None = None
    label: str | None = None
    subject: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedVolume:
    image: np.ndarray  # (sequences, x, y, z) float32, RAS, z-scored in the brain
    brain: np.ndarray  # (x, y, z) bool
    segmentation: np.ndarray | None  # (x, y, z) uint8
    affine: np.ndarray
    sequences: tuple[str, ...]
    source_orientation: str
    source_spacing: tuple[float, ...]
    source_shape: tuple[int, ...]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


@dataclass(frozen=True)
class VolumeSlice:
    index: int
    rgb: np.ndarray  # (h, w, 3) uint8
    label: str | None
    lesion_mm2: float


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_segmentation(relative: Path) -> bool:
    words = {part.lower() for part in relative.parts[:-1]} | set(re.split(r"[-_.]", _stem(relative).lower()))
    return bool(words & SEGMENTATION_WORDS)


def find_cases(root: Path) -> list[VolumeCase]:
    """Group NIfTI files under ``root`` into cases; see the module docstring for the naming rules."""
    if not root.is_dir():
        raise DataError(root, "not a folder")
    files = sorted(p for p in root.rglob("*") if is_nifti(p))
    if not files:
        raise DataError(root, "no NIfTI volumes found (expected *.nii or *.nii.gz)")
    cases: dict[str, VolumeCase] = {}
    segmentations = []
    for path in files:
        relative = path.relative_to(root)
        if _is_segmentation(relative):
            segmentations.append(relative)
            continue
        match = _SEQUENCE_PATTERN.match(_stem(path))
        name, sequence = (match["case"], SEQUENCE_NAMES[match["seq"].lower()]) if match else (_stem(path), SINGLE_SEQUENCE)
        case = cases.setdefault(name, VolumeCase(name, label=_class_folder(relative, name)))
        if sequence in case.sequences:
            raise DataError(path, f"a second {sequence} volume for one case (first: {case.sequences[sequence].name})")
        case.sequences[sequence] = path
    for relative in segmentations:
        _attach_segmentation(root, relative, cases)
    _apply_label_table(root, cases)
    return list(cases.values())


def _class_folder(relative: Path, case: str) -> str | None:
    """``<label>/...`` above a case, unless that folder is the case's own (named after it)."""
    if len(relative.parts) < 2:
        return None
    top = relative.parts[0]
    return None if top.lower().startswith(case.lower()) or top.lower() in SEGMENTATION_WORDS else top


def _attach_segmentation(root: Path, relative: Path, cases: dict[str, VolumeCase]) -> None:
    match = _SEGMENTATION_PATTERN.match(_stem(relative))
    named = match["case"] if match else _stem(relative)
    if named in cases:
        owner = cases[named]
    else:
        siblings = [c for c in cases.values() if any(p.relative_to(root).parts[0] == relative.parts[0] for p in c.sequences.values())]
        if len(siblings) != 1:
            return  # a segmentation we cannot place is not used, rather than guessed
        owner = siblings[0]
    if owner.segmentation is None:
        owner.segmentation = root / relative


def _apply_label_table(root: Path, cases: dict[str, VolumeCase]) -> None:
    table_file = root / "labels.csv"
    if not table_file.exists():
        return
    import pandas as pd

    table = pd.read_csv(table_file, dtype=str)
    if not {"case", "label"} <= set(table.columns):
        raise DataError(table_file, "needs 'case' and 'label' columns")
    for row in table.itertuples():
        if row.case in cases:
            cases[row.case].label = row.label


def cache_key(case: VolumeCase, config: VolumeConfig, code: str) -> str:
    """Files (path, size, mtime), preprocessing params and code, hashed: the cache's identity."""
    digest = hashlib.sha256(f"{config.model_dump_json()}:{code}".encode())
    for path in sorted([*case.sequences.values(), *([case.segmentation] if case.segmentation else [])]):
        digest.update(file_signature(path).encode())
    return digest.hexdigest()[:24]


def load_or_prepare(case: VolumeCase, config: VolumeConfig, cache_dir: Path) -> PreparedVolume:
    """``prepare`` once per (files, params, code): a rerun loads the result instead."""
    from components.imaging import code_version

    cache = cache_dir / f"{cache_key(case, config, code_version('components.volumes'))}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            segmentation = stored["segmentation"] if meta["has_segmentation"] else None
            return PreparedVolume(
                stored["image"].astype(np.float32),
                stored["brain"],
                segmentation,
                stored["affine"],
                tuple(meta["sequences"]),
                meta["source_orientation"],
                tuple(meta["source_spacing"]),
                tuple(meta["source_shape"]),
            )
    prepared = prepare(case, config)
    meta = {
        "has_segmentation": prepared.segmentation is not None,
        "sequences": prepared.sequences,
        "source_orientation": prepared.source_orientation,
        "source_spacing": prepared.source_spacing,
        "source_shape": prepared.source_shape,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        cache,
        image=prepared.image.astype(np.float16),
        brain=prepared.brain,
        segmentation=prepared.segmentation if prepared.segmentation is not None else np.zeros(0, np.uint8),
        affine=prepared.affine,
        meta=json.dumps(meta),
    )
    return prepared


def _load(path: Path):
    """A (1, x, y, z) MONAI MetaTensor; a file nibabel cannot read is a DataError naming it."""
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # a GPU decoder we do not use
    import warnings

    from monai.transforms import LoadImage

    _refuse_oversized(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            image = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(path))
    except Exception as exc:  # nibabel raises many types for a broken file
        raise DataError(path, f"not a readable NIfTI volume ({exc.__class__.__name__})") from None
    if image.ndim != 4 or image.shape[0] != 1:
        raise DataError(path, f"expected one 3D volume, got shape {tuple(image.shape)[1:]}")
    if not np.isfinite(image.numpy()).all():
        raise DataError(path, "volume holds NaN or infinite values")
    return image


def _refuse_oversized(path: Path) -> None:
    """Refuses, from the header alone, a volume larger than any brain MRI (a header nibabel cannot read is left to
    the loader, which names the problem)."""
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        shape, zooms = header.get_data_shape(), header.get_zooms()[:3]
    except Exception:
        return
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOLUME_VOXELS:
        dims = " x ".join(str(n) for n in shape)
        raise DataError(path, f"{dims} voxels: more than any brain MRI (at most {MAX_VOLUME_VOXELS:,}); not decoded")
    extent = max(float(n) * abs(float(z)) for n, z in zip(shape, zooms))
    if extent > MAX_FIELD_OF_VIEW_MM:
        raise DataError(
            path,
            f"a field of view of {extent:,.0f} mm: larger than any head (at most {MAX_FIELD_OF_VIEW_MM:.0f} mm); check the voxel sizes",
        )


def prepare(case: VolumeCase, config: VolumeConfig) -> PreparedVolume:
    """Orientation, spacing, optional registration, brain mask, crop, normalisation (see module docstring)."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForegroundd, NormalizeIntensity, Orientation, Spacing

    order = tuple(sorted(case.sequences))
    channels = [_load(case.sequences[name]) for name in order]
    first = channels[0]
    for name, channel in zip(order[1:], channels[1:]):
        if channel.shape != first.shape or not np.allclose(channel.affine, first.affine, atol=1e-3):
            raise DataError(case.sequences[name], f"not on the same voxel grid as the {order[0]} volume (register the sequences first)")
    source_affine = first.affine.numpy()
    image = MetaTensor(torch.cat([c.as_tensor() for c in channels]).float(), affine=first.affine)
    image = Spacing(pixdim=config.spacing, mode="bilinear")(Orientation(axcodes="RAS", labels=RAS_LABELS)(image))
    segmentation = None
    if case.segmentation is not None:
        seg = _load(case.segmentation)
        if seg.shape[1:] != first.shape[1:]:
            raise DataError(
                case.segmentation, f"segmentation shape {tuple(seg.shape)[1:]} differs from the volume's {tuple(first.shape)[1:]}"
            )
        seg = Spacing(pixdim=config.spacing, mode="nearest")(Orientation(axcodes="RAS", labels=RAS_LABELS)(seg.float()))
        segmentation = seg
    if config.register_to_template:  # onto the template's 2 mm grid, then back to the wanted spacing
        image, segmentation = register_to_template(image, segmentation)
        image = Spacing(pixdim=config.spacing, mode="bilinear")(image)
        segmentation = Spacing(pixdim=config.spacing, mode="nearest")(segmentation) if segmentation is not None else None
    brain = brain_mask(image.numpy(), config.spacing)
    data = {"image": image, "brain": MetaTensor(torch.from_numpy(brain[None].astype(np.float32)), affine=image.affine)}
    if segmentation is not None:
        data["segmentation"] = segmentation
    data = CropForegroundd(keys=list(data), source_key="brain", margin=config.crop_margin, allow_smaller=True)(data)
    brain_cropped = data["brain"].numpy()[0] > 0.5
    masked = data["image"] * torch.from_numpy(brain_cropped[None])
    normalised = NormalizeIntensity(nonzero=True, channel_wise=True)(masked)
    return PreparedVolume(
        image=np.asarray(normalised.numpy(), dtype=np.float32),
        brain=brain_cropped,
        segmentation=(data["segmentation"].numpy()[0] > 0).astype(np.uint8) if segmentation is not None else None,
        affine=np.asarray(data["image"].affine.numpy(), dtype=np.float64),
        sequences=order,
        source_orientation="".join(nib.aff2axcodes(source_affine)),
        source_spacing=tuple(round(float(v), 4) for v in np.sqrt((source_affine[:3, :3] ** 2).sum(axis=0))),
        source_shape=tuple(int(v) for v in first.shape[1:]),
    )


def brain_mask(image: np.ndarray, spacing: tuple[float, ...] | list[float]) -> np.ndarray:
    """(x, y, z) brain mask of a (c, x, y, z) volume; the method is in the module docstring."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    signal = np.abs(image).mean(axis=0)
    stripped = (signal == 0).mean() > SKULL_STRIPPED_BACKGROUND
    mask = signal > 0 if stripped else signal > threshold_otsu(signal.ravel())
    ball = None if stripped else _ellipsoid(BRAIN_MASK_MARGIN_MM, spacing, signal.shape)
    if ball is not None:
        mask = ndimage.binary_erosion(mask, structure=ball)
    components, count = ndimage.label(mask)
    if count == 0:
        raise DataError("volume", "no brain found (empty or constant volume)")
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    mask = components == (int(np.argmax(sizes)) + 1)
    if ball is not None:
        mask = ndimage.binary_dilation(mask, structure=ball)
    return ndimage.binary_fill_holes(mask)


def _ellipsoid(radius_mm: float, spacing, shape: tuple[int, ...]) -> np.ndarray:
    """A structuring element of ``radius_mm`` in world units, never thicker than a quarter of
    the volume along an axis (a thin slab of slices is not eroded away)."""
    radii = [max(0, min(int(round(radius_mm / s)), n // 4)) for s, n in zip(spacing, shape)]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radii)) <= 1


def register_to_template(image, segmentation=None):
    """Rigid (Euler 3D, Mattes mutual information) registration of the volume to the 2 mm MNI152
    template; every channel and the segmentation are resampled onto the template grid."""
    import SimpleITK as sitk
    import torch
    from monai.data import MetaTensor
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    fixed = _to_sitk(np.asarray(template.get_fdata(), dtype=np.float32), template.affine)
    moving = _to_sitk(image.numpy().mean(axis=0), image.affine.numpy())
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed=42)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2, 1])
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)

    def resample(volume: np.ndarray, interpolator) -> np.ndarray:
        moved = sitk.Resample(_to_sitk(volume, image.affine.numpy()), fixed, transform, interpolator, 0.0)
        return sitk.GetArrayFromImage(moved).transpose(2, 1, 0)

    channels = np.stack([resample(channel, sitk.sitkLinear) for channel in image.numpy()])
    affine = torch.as_tensor(template.affine)
    registered = MetaTensor(torch.from_numpy(channels), affine=affine)
    if segmentation is not None:
        seg = resample(segmentation.numpy()[0], sitk.sitkNearestNeighbor)
        segmentation = MetaTensor(torch.from_numpy(seg[None]), affine=affine)
    return registered, segmentation


def _to_sitk(volume: np.ndarray, affine: np.ndarray):
    """An (x, y, z) RAS-affine array as a SimpleITK image (which is LPS, indexed z, y, x)."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.sqrt((lps**2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    return image


def axial_slices(volume: PreparedVolume, config: VolumeConfig, volume_label: str | None, unlabelled: bool = False) -> list[VolumeSlice]:
    """Brain-bearing axial slices with their labels (the rule is in the module docstring); ``unlabelled`` keeps
    the slices whose label is unknown too (label None), as prediction needs every slice."""
    brain_area = volume.brain.sum(axis=(0, 1))
    spacing = volume.spacing
    pixel_mm2 = spacing[0] * spacing[1]
    channels = _display_channels(volume, config.slice_sequences)
    slices = []
    for z in np.flatnonzero(brain_area >= config.min_brain_fraction * brain_area.max()):
        lesion_mm2 = float(volume.segmentation[:, :, z].sum() * pixel_mm2) if volume.segmentation is not None else float("nan")
        label = _slice_label(lesion_mm2, volume.segmentation is not None, volume_label, config)
        if label is None and not unlabelled:
            continue
        rgb = np.stack([channel[:, :, z].T[::-1, ::-1] for channel in channels], axis=-1)
        slices.append(VolumeSlice(int(z), np.ascontiguousarray(rgb), label, lesion_mm2))
    return slices


def _slice_label(lesion_mm2: float, has_segmentation: bool, volume_label: str | None, config: VolumeConfig) -> str | None:
    if has_segmentation:
        if lesion_mm2 == 0:
            return NO_TUMOUR
        return "tumor" if lesion_mm2 >= config.min_lesion_mm2 else None
    if volume_label == NO_TUMOUR or (config.slices_take_volume_label and volume_label):
        return volume_label
    return None


def _display_channels(volume: PreparedVolume, wanted: list[str]) -> list[np.ndarray]:
    """Three uint8 channels: the wanted sequences where present (else the mean of those present),
    each scaled by its own 0.5–99.5 brain percentiles."""
    scaled = {}
    for name, channel in zip(volume.sequences, volume.image):
        inside = channel[volume.brain]
        low, high = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
        scaled[name] = (np.clip((channel - low) / max(high - low, 1e-6), 0, 1) * volume.brain * 255).astype(np.uint8)
    fallback = np.mean(list(scaled.values()), axis=0).astype(np.uint8)
    return [scaled.get(name, fallback) for name in wanted[:3]] + [fallback] * (3 - len(wanted[:3]))


def save_nifti(volume: PreparedVolume, path: Path) -> None:
    """The preprocessed (x, y, z, sequences) volume as NIfTI: header holds geometry only, no identifiers."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.moveaxis(volume.image, 0, -1).astype(np.float32), volume.affine), path)
