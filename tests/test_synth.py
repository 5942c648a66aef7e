from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import SynthConfig
from components.imaging import read_slice
from components.synth import run


def test_cohort_has_both_classes_masks_and_demographics(tiny_cohort: Path):
    metadata = pd.read_csv(tiny_cohort / "metadata.csv")
    assert set(metadata["file"].str.split("/").str[0]) == {"notumor", "tumor"}
    assert {"subject_id", "age", "sex", "site", "lesion_mm", "mask"} <= set(metadata.columns)
    for row in metadata.itertuples():
        has_lesion = read_slice(tiny_cohort / row.mask).max() > 0
        assert has_lesion == row.file.startswith("tumor/")
        assert np.isnan(row.lesion_mm) != has_lesion


def test_same_seed_same_images(tmp_path: Path):
    a = run(SynthConfig(out=tmp_path / "a", subjects=4, image_size=48, seed=5))
    b = run(SynthConfig(out=tmp_path / "b", subjects=4, image_size=48, seed=5))
    for file in a["file"]:
        np.testing.assert_array_equal(read_slice(tmp_path / "a" / file), read_slice(tmp_path / "b" / file))
    assert a.drop(columns=[]).equals(b)


def test_scanner_shift_changes_intensity_profile(tmp_path: Path):
    def mean_intensity(shift: str) -> float:
        out = tmp_path / shift
        metadata = run(SynthConfig(out=out, subjects=12, slices_per_subject=1, image_size=64, shift=shift, seed=9))
        return float(np.mean([read_slice(out / f).mean() for f in metadata["file"]]))

    assert mean_intensity("scanner") < 0.8 * mean_intensity("none")


def test_lesion_size_shift_makes_smaller_lesions(tmp_path: Path):
    normal = run(SynthConfig(out=tmp_path / "n", subjects=20, slices_per_subject=1, image_size=48, seed=2))
    small = run(SynthConfig(out=tmp_path / "s", subjects=20, slices_per_subject=1, image_size=48, shift="lesion_size", seed=2))
    assert small["lesion_mm"].max() < normal["lesion_mm"].median()


def test_volumes_on_request_are_nifti_with_spacing_and_masks(tmp_path: Path):
    import nibabel as nib

    run(SynthConfig(out=tmp_path, subjects=4, slices_per_subject=1, image_size=48, volumes=True, volume_size=48, seed=4))
    volumes = pd.read_csv(tmp_path / "volumes" / "metadata.csv")
    assert len(volumes) == 4
    for row in volumes.itertuples():
        image = nib.load(tmp_path / "volumes" / row.file)
        mask = np.asarray(nib.load(tmp_path / "volumes" / row.mask).dataobj)
        assert image.shape == (48, 48, 48)
        assert image.header.get_zooms() == pytest.approx((220 / 48,) * 3)
        assert (mask.sum() > 0) == row.file.startswith("tumor/")
