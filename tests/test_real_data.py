"""The class-folder adapter, validation and leak-free split on the real Masoud set (skipped where absent)."""

from pathlib import Path

import pytest

from components.config import IngestConfig, SplitConfig, ValidateConfig
from components.ingest import run as ingest
from components.split import check_no_leak
from components.split import run as split
from components.validate import run as validate
from tests.conftest import bench_module, shared_data

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def test_masoud_training_ingests_validates_and_splits_without_leaks(tmp_path: Path):
    source = shared_data("masoud-224/Training")
    manifest = tmp_path / "manifest.csv"
    result = ingest(IngestConfig(source=source, out=manifest))
    counts = result.manifest["label"].value_counts().to_dict()
    assert counts == {"notumor": 1591, "pituitary": 1454, "meningioma": 1336, "glioma": 1321}
    conflicts = result.quarantined["problem"].str.contains("an exact copy of it")
    assert conflicts.sum() == len(result.quarantined) == 6, "three mirrored copies labelled meningioma and pituitary"
    groups = result.manifest["duplicate_group"].value_counts()
    assert len(groups) < 0.8 * len(result.manifest), "the set is known to be full of near-duplicates"
    assert groups.max() < 100, "near-duplicate groups must not chain into one giant component"
    assert validate(ValidateConfig(manifest=manifest, report_dir=tmp_path / "reports")).success
    assigned = split(SplitConfig(manifest=manifest, out=tmp_path / "split.csv"))
    check_no_leak(assigned)
    assert set(assigned["split"]) == {"train", "val", "test"}
    assert not bench_module("mirrored_copies").mirrored_copies_of_test_slices(assigned).any(), (
        "a mirrored copy of a test slice in train shows it to the network"
    )


def test_lgg_patients_become_a_validated_patient_grouped_split_with_demographics(tmp_path: Path):
    source = shared_data("lgg-kaggle_3m/kaggle_3m")
    manifest = tmp_path / "manifest.csv"
    result = ingest(IngestConfig(source=source, out=manifest))
    frame = result.manifest
    assert frame["subject"].nunique() == 40 and len(result.quarantined) == 0
    assert {"tumor", "notumor"} == set(frame["label"])
    assert frame.groupby("subject")["age"].first().notna().sum() == 39, "one patient has no age in data.csv"
    assert "clinical_gender" in frame.columns and set(frame["sex"].dropna()) == {"code-1", "code-2"}
    assert validate(ValidateConfig(manifest=manifest, report_dir=tmp_path / "reports")).success
    assigned = split(SplitConfig(manifest=manifest, out=tmp_path / "split.csv"))
    check_no_leak(assigned)
    assert assigned.groupby("subject")["split"].nunique().max() == 1


def test_nifti_cases_of_brats_and_tcga_become_volumes_and_labelled_slices(tmp_path: Path):
    import pandas as pd

    source = shared_data("nifti")
    result = ingest(IngestConfig(source=source, out=tmp_path / "manifest.csv", derived_dir=tmp_path / "derived"))
    volumes = pd.read_csv(tmp_path / "derived" / "volumes.csv")
    assert len(volumes) == 2 and set(volumes["sequences"]) == {"flair+t1+t1c+t2"}
    assert set(volumes["source_orientation"]) == {"LPS"}, "both are stored LPS; the derived volumes are RAS"
    labelled = volumes[volumes["has_segmentation"]]
    assert len(labelled) == 1 and labelled["tumor_slices"].iloc[0] > 10, "TCGA-DU-7294's fusion segmentation labels its slices"
    assert volumes.loc[~volumes["has_segmentation"], "slices"].iloc[0] == 0, "the BraTS case has no segmentation: 3D use only"
    assert set(result.manifest["label"]) == {"tumor", "notumor"} and len(result.quarantined) == 0
    assert not result.manifest["path"].str.contains("TCGA|BraTS").any(), "derived file names carry pseudonyms only"
