"""Volumes: case finding by name, orientation, spacing, brain mask, slice labels, cache, registration."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from components.config import VolumeConfig
from components.errors import DataError
from components.volumes import VolumeCase, axial_slices, brain_mask, find_cases, load_or_prepare, prepare

LPS = np.diag([-2.0, -2.0, 4.0, 1.0])  # patient left-right and anterior-posterior flipped, anisotropic


def _save(path: Path, data: np.ndarray, affine: np.ndarray = LPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _head(seed: int = 0, size: int = 48) -> np.ndarray:
    """A noisy background, a bright 'skull' shell and a 'brain' sphere with a marker at the patient's
    left-anterior: under the LPS affine, high voxel x is the patient's left and low voxel y anterior."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size, size, size)) - size / 2
    radius = np.sqrt((grid**2).sum(axis=0))
    volume = np.abs(rng.normal(0, 3, (size,) * 3))
    volume[(radius > 19) & (radius < 21)] = 150
    volume[radius < 16] = 100 + rng.normal(0, 5, (radius < 16).sum())
    volume[32:36, 12:16, 22:26] = 200
    return volume.astype(np.float32)


def test_find_cases_groups_brats_names_segmentations_and_class_folders(tmp_path: Path) -> None:
    blank = np.zeros((4, 4, 4), np.float32)
    for name in ("BraTS-X-001/BraTS-X-001-t1c.nii.gz", "BraTS-X-001/BraTS-X-001-t2f.nii.gz", "BraTS-X-001/BraTS-X-001-seg.nii.gz"):
        _save(tmp_path / name, blank)
    for name in ("TCGA-AB-1/raw_bet/TCGA-AB-1_fla_bet.nii.gz", "TCGA-AB-1/raw_bet/TCGA-AB-1_t1_bet.nii.gz"):
        _save(tmp_path / name, blank)
    _save(tmp_path / "TCGA-AB-1/fusion/simple.nii.gz", blank)
    _save(tmp_path / "TCGA-AB-1/fusion/mav.nii.gz", blank)
    _save(tmp_path / "notumor/sub-7.nii.gz", blank)
    _save(tmp_path / "masks/sub-7.nii.gz", blank)
    cases = {case.case: case for case in find_cases(tmp_path)}
    assert set(cases) == {"BraTS-X-001", "TCGA-AB-1", "sub-7"}
    assert set(cases["BraTS-X-001"].sequences) == {"t1c", "flair"} and cases["BraTS-X-001"].segmentation.name == "BraTS-X-001-seg.nii.gz"
    assert set(cases["TCGA-AB-1"].sequences) == {"flair", "t1"} and cases["TCGA-AB-1"].segmentation.name == "mav.nii.gz"
    assert cases["sub-7"].label == "notumor" and cases["sub-7"].segmentation.parent.name == "masks"
    assert cases["BraTS-X-001"].label is None


def test_find_cases_refuses_a_folder_without_volumes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no NIfTI"):
        find_cases(tmp_path)


def test_prepare_reorients_to_ras_resamples_and_keeps_the_brain_only(tmp_path: Path) -> None:
    path = _save(tmp_path / "case-t1.nii.gz", _head())
    config = VolumeConfig(spacing=(2.0, 2.0, 2.0), crop_margin=2)
    volume = prepare(VolumeCase("case", {"t1": path}), config)
    assert volume.source_orientation == "LPS" and volume.source_spacing == (2.0, 2.0, 4.0)
    assert np.allclose(volume.spacing, (2.0, 2.0, 2.0))
    assert np.all(np.diag(volume.affine)[:3] > 0), "RAS: every axis increases towards R, A, S"
    # the 'skull' shell is not brain: the crop is about the 32-voxel sphere (+ margins), not the 42-voxel shell
    assert volume.brain.shape[0] <= 32 / 2 * 2 + 2 * 2 + 2
    inside = volume.image[0][volume.brain]
    assert abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05, "z-scored inside the brain"
    assert np.all(volume.image[0][~volume.brain] == 0)
    # in RAS the patient's left is low x and anterior is high y
    x, y, _ = np.unravel_index(np.argmax(volume.image[0]), volume.brain.shape)
    assert x < volume.brain.shape[0] / 2 and y > volume.brain.shape[1] / 2


def test_brain_mask_of_a_skull_stripped_volume_is_its_nonzero_voxels() -> None:
    volume = np.zeros((1, 20, 20, 20), np.float32)
    volume[0, 5:15, 5:15, 5:15] = 1.0
    assert brain_mask(volume, (1.0, 1.0, 1.0)).sum() == 1000


def test_slices_take_labels_from_the_segmentation_and_skip_ambiguous_ones(tmp_path: Path) -> None:
    head = _head()
    segmentation = np.zeros_like(head, dtype=np.uint8)
    segmentation[20:26, 20:26, 20:23] = 1  # 36 voxels × 2×2 mm = 144 mm² in three slices
    segmentation[24, 24, 26] = 1  # one voxel: 4 mm², below the threshold: ambiguous
    case = VolumeCase("c", {"t1": _save(tmp_path / "c-t1.nii.gz", head)}, _save(tmp_path / "c-seg.nii.gz", segmentation))
    config = VolumeConfig(spacing=(2.0, 2.0, 4.0), min_lesion_mm2=10.0, min_brain_fraction=0.2)
    slices = axial_slices(prepare(case, config), config, None)
    labels = [s.label for s in slices]
    assert labels.count("tumor") == 3 and "notumor" in labels
    assert all(s.lesion_mm2 == 0 for s in slices if s.label == "notumor")
    assert all(s.rgb.dtype == np.uint8 and s.rgb.shape[-1] == 3 for s in slices)
    no_mask = VolumeCase("d", {"t1": case.sequences["t1"]})
    assert {s.label for s in axial_slices(prepare(no_mask, config), config, "notumor")} == {"notumor"}
    assert axial_slices(prepare(no_mask, config), config, "tumor") == [], "a tumour volume without a mask has no slice labels"


def test_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    case = VolumeCase("c", {"t1": _save(tmp_path / "c-t1.nii.gz", _head())})
    config = VolumeConfig(spacing=(4.0, 4.0, 4.0))
    first = load_or_prepare(case, config, tmp_path / "cache")

    def refuse(*args) -> None:
        raise RuntimeError("prepared again despite the cache")

    monkeypatch.setattr("components.volumes.prepare", refuse)
    second = load_or_prepare(case, config, tmp_path / "cache")
    assert np.allclose(first.image, second.image, atol=1e-2) and first.sequences == second.sequences
    with pytest.raises(RuntimeError, match="prepared again"):  # other params: a new cache entry
        load_or_prepare(case, VolumeConfig(spacing=(3.0, 3.0, 3.0)), tmp_path / "cache")


def test_unreadable_and_mismatched_volumes_are_data_errors(tmp_path: Path) -> None:
    broken = tmp_path / "b-t1.nii.gz"
    broken.write_bytes(b"not a volume")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        prepare(VolumeCase("b", {"t1": broken}), VolumeConfig())
    small = _save(tmp_path / "m-t2.nii.gz", np.ones((8, 8, 8), np.float32))
    with pytest.raises(DataError, match="same voxel grid"):
        prepare(VolumeCase("m", {"t1": _save(tmp_path / "m-t1.nii.gz", _head()), "t2": small}), VolumeConfig())


def test_a_volume_larger_than_any_brain_mri_is_refused_from_its_header(tmp_path: Path) -> None:
    from tests.endpoint import header_only_nifti_bytes

    bomb = tmp_path / "bomb.nii"
    bomb.write_bytes(header_only_nifti_bytes((2048, 2048, 2048)))  # 8 GB of voxels declared, none held
    with pytest.raises(DataError, match="bomb.nii: 2048 x 2048 x 2048 voxels: more than any brain MRI"):
        prepare(VolumeCase("bomb", {"image": bomb}), VolumeConfig())
    wide = _save(tmp_path / "wide.nii.gz", np.ones((16, 16, 16), np.float32), np.diag([50.0, 50.0, 50.0, 1.0]))
    with pytest.raises(DataError, match="wide.nii.gz: a field of view of 800 mm: larger than any head"):
        prepare(VolumeCase("wide", {"image": wide}), VolumeConfig())  # resampled to 1 mm: 800^3 voxels


def test_rigid_registration_brings_a_rotated_template_back() -> None:
    import torch
    from monai.data import MetaTensor
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    from components.volumes import register_to_template

    template = load_mni152_template(resolution=2)
    reference = np.asarray(template.get_fdata(), dtype=np.float32)
    rotated = ndimage.rotate(reference, 12, axes=(0, 1), reshape=False, order=1)
    moving = MetaTensor(torch.from_numpy(rotated[None]), affine=torch.as_tensor(template.affine))
    registered, _ = register_to_template(moving)

    def correlation(volume: np.ndarray) -> float:
        return float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1])

    assert correlation(registered.numpy()[0]) > correlation(rotated) + 0.05
    assert correlation(registered.numpy()[0]) > 0.95
