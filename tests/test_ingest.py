import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import IngestConfig
from components.errors import DataError
from components.ingest import run


def _slice(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(path)


def test_kaggle_layout_with_training_and_testing(tmp_path: Path):
    root = tmp_path / "kaggle"
    for i, (split, label) in enumerate([("Training", "glioma"), ("Training", "notumor"), ("Testing", "glioma"), ("Testing", "notumor")]):
        _slice(root / split / label / f"img{i}.jpg", i)
    result = run(IngestConfig(source=root, out=tmp_path / "manifest.csv"))
    manifest = result.manifest
    assert sorted(manifest["label"]) == ["glioma", "glioma", "notumor", "notumor"]
    assert sorted(manifest["source_split"]) == ["test", "test", "train", "train"]
    assert manifest["image_id"].is_unique and manifest["duplicate_group"].nunique() == 4


def test_metadata_is_joined_and_subject_ids_are_pseudonymised(tiny_cohort: Path, tmp_path: Path):
    manifest = run(IngestConfig(source=tiny_cohort, out=tmp_path / "m.csv")).manifest
    metadata = pd.read_csv(tiny_cohort / "metadata.csv")
    assert manifest["subject"].nunique() == metadata["subject_id"].nunique()
    assert manifest["age"].notna().all() and set(manifest["sex"]) <= {"F", "M"}
    written = (tmp_path / "m.csv").read_text()
    for original in metadata["subject_id"]:
        assert original not in written
    assert all(manifest.groupby("subject")["age"].nunique() == 1)


def test_unreadable_files_are_quarantined_not_fatal(tiny_cohort: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(tiny_cohort, root)
    (root / "tumor" / "zz-broken.png").write_bytes(b"garbage")
    result = run(IngestConfig(source=root, out=tmp_path / "m.csv"))
    assert list(result.quarantined["file"]) == ["tumor/zz-broken.png"]
    assert result.quarantined["image_id"].iloc[0].startswith("img-")
    assert "not a readable image" in result.quarantined["problem"].iloc[0]
    assert len(result.manifest) == len(pd.read_csv(tiny_cohort / "metadata.csv"))


def test_folder_without_class_folders_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        run(IngestConfig(source=tmp_path / "empty", out=tmp_path / "m.csv"))


def _lgg_study(root: Path, patient: str, suffix: str, lesions: list[bool]) -> None:
    study = root / f"{patient}_19990101"
    study.mkdir(parents=True)
    rng = np.random.default_rng(len(patient))
    for n, lesion in enumerate(lesions, start=1):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(study / f"{study.name}_{n}{suffix}")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[10:14, 10:14] = 255 if lesion else 0
        Image.fromarray(mask).save(study / f"{study.name}_{n}_mask{suffix}")


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_lgg_layout_labels_from_masks_and_joins_clinical_data(tmp_path: Path, suffix: str):
    root = tmp_path / "kaggle_3m"
    _lgg_study(root, "TCGA_AA_0001", suffix, [False, True, True])
    _lgg_study(root, "TCGA_BB_0002", suffix, [False, False, True])
    pd.DataFrame({"Patient": ["TCGA_AA_0001", "TCGA_BB_0002"], "gender": [1, 2], "age_at_initial_pathologic": [44, 61]}).to_csv(
        root / "data.csv", index=False
    )
    result = run(IngestConfig(source=root, out=tmp_path / "m.csv"))
    manifest = result.manifest.sort_values("path")
    assert manifest["label"].tolist() == ["notumor", "tumor", "tumor", "notumor", "notumor", "tumor"]
    assert manifest.groupby("subject")["age"].first().sort_values().tolist() == [44, 61]
    assert set(manifest["clinical_gender"]) == {1, 2}
    assert manifest["mask_path"].str.endswith(f"_mask{suffix}").all()
    assert "TCGA_AA_0001" not in "".join(manifest["subject"])
    assert manifest["slice_index"].tolist() == [1, 2, 3, 1, 2, 3], "the number in the series, from the file name"
    assert manifest["volume_id"].nunique() == 2 and manifest["volume_id"].str.startswith("vol-").all()
    assert not any("TCGA" in volume for volume in manifest["volume_id"])


def test_lgg_slice_without_mask_is_quarantined(tmp_path: Path):
    root = tmp_path / "kaggle_3m"
    _lgg_study(root, "TCGA_AA_0001", ".png", [True, False])
    next(root.glob("*/*_2_mask.png")).unlink()
    pd.DataFrame({"Patient": ["TCGA_AA_0001"], "age_at_initial_pathologic": [50]}).to_csv(root / "data.csv", index=False)
    result = run(IngestConfig(source=root, out=tmp_path / "m.csv", format="lgg"))
    assert len(result.manifest) == 1
    assert "no mask file" in result.quarantined["problem"].iloc[0]


def test_a_rerun_reads_only_new_or_changed_files(tiny_cohort: Path, tmp_path: Path, monkeypatch):
    import components.ingest as ingest_module

    root = tmp_path / "data"
    shutil.copytree(tiny_cohort, root)
    first = run(IngestConfig(source=root, out=tmp_path / "m.csv")).manifest
    changed = next((root / "tumor").glob("*.png"))
    changed.write_bytes(b"now broken")
    reads = []
    real_read = ingest_module.read_slice
    monkeypatch.setattr(ingest_module, "read_slice", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    second = run(IngestConfig(source=root, out=tmp_path / "m.csv"))
    assert reads == [changed]
    assert len(second.manifest) == len(first) - 1 and len(second.quarantined) == 1


def test_a_mirrored_copy_joins_its_original_unless_mirror_correlation_is_off(tmp_path: Path):
    root = tmp_path / "data"
    for i, label in enumerate(["glioma", "notumor"]):
        _slice(root / label / f"s{i}.png", i)
    Image.open(root / "glioma" / "s0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "glioma" / "mirrored.png")
    grouped = run(IngestConfig(source=root, out=tmp_path / "m.csv")).manifest
    assert grouped["duplicate_group"].nunique() == 2
    apart = run(IngestConfig(source=root, out=tmp_path / "m.csv", mirror_correlation=None)).manifest
    assert apart["duplicate_group"].nunique() == 3


def test_copies_of_one_image_with_two_labels_are_quarantined_by_pseudonym(tmp_path: Path, capsys):
    root = tmp_path / "data"
    for i, label in enumerate(["glioma", "notumor", "meningioma"]):
        _slice(root / label / f"s{i}.png", i)
    Image.open(root / "glioma" / "s0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "glioma" / "mirrored.png")
    (root / "pituitary").mkdir()
    shutil.copy(root / "notumor" / "s1.png", root / "pituitary" / "copy.png")
    result = run(IngestConfig(source=root, out=tmp_path / "m.csv"))
    assert sorted(result.quarantined["file"]) == ["notumor/s1.png", "pituitary/copy.png"]
    assert set(result.quarantined["kind"]) == {"label_conflict"}, "validation gates their share apart from unreadable files"
    problems = dict(zip(result.quarantined["file"], result.quarantined["problem"]))
    assert "labelled 'pituitary', but an exact copy of it (as it is or mirrored) is labelled 'notumor'" in problems["pituitary/copy.png"]
    assert sorted(result.manifest["label"]) == ["glioma", "glioma", "meningioma"], "a mirrored copy with the same label stays"
    assert "copy.png" not in capsys.readouterr().out, "the log names quarantined images by pseudonym only"
    unchecked = run(IngestConfig(source=root, out=tmp_path / "m.csv", label_conflict_correlation=None))
    assert len(unchecked.quarantined) == 0 and len(unchecked.manifest) == 5


def test_a_feedback_label_that_contradicts_a_source_image_quarantines_the_feedback_copy_alone(tmp_path: Path):
    root, feedback = tmp_path / "data", tmp_path / "feedback"
    for i, label in enumerate(["glioma", "notumor"]):
        _slice(root / label / f"s{i}.png", i)
    (feedback / "glioma").mkdir(parents=True)
    shutil.copy(root / "notumor" / "s1.png", feedback / "glioma" / "served.png")
    result = run(IngestConfig(source=root, out=tmp_path / "m.csv", feedback_dir=feedback))
    assert list(result.quarantined["file"]) == ["feedback/glioma/served.png"], "the source image, and so the test split, stays"
    assert sorted(result.manifest["label"]) == ["glioma", "notumor"]


def test_numeric_subject_ids_keep_a_subjects_images_together(tmp_path: Path):
    root = tmp_path / "data"
    for i, label in enumerate(["tumor", "tumor", "notumor"]):
        _slice(root / label / f"s{i}.png", i)
    pd.DataFrame({"file": ["tumor/s0.png", "tumor/s1.png", "notumor/s2.png"], "subject_id": ["0101", "0101", "0102"]}).to_csv(
        root / "metadata.csv", index=False
    )
    manifest = run(IngestConfig(source=root, out=tmp_path / "m.csv")).manifest
    assert manifest["subject"].nunique() == 2


def test_metadata_must_name_each_image_once_and_says_which_lines_name_none(tmp_path: Path, capsys):
    root = tmp_path / "data"
    for i, label in enumerate(["tumor", "tumor", "notumor"]):
        _slice(root / label / f"Doe_Jane_{i}.png", i)  # names that carry a patient's: never printed
    metadata = root / "metadata.csv"
    metadata.write_text("file,subject_id\ntumor/Doe_Jane_0.png,A\ntumor/Doe_Jane_1.png,A\ntumor/Doe_Jane_0.png,B\n")
    with pytest.raises(DataError, match=r"metadata.csv: 1 file\(s\) on more than one row, e.g. on lines 2, 4: one row per image"):
        run(IngestConfig(source=root, out=tmp_path / "m.csv"))
    metadata.write_text("file,subject_id\ntumor/Doe_Jane_0.png,A\ntumor/Doe_Jane_1.png,A\ntumour/Doe_Jane_2.png,B\n")  # misspelt
    assert run(IngestConfig(source=root, out=tmp_path / "m.csv")).manifest["subject"].nunique() == 2
    printed = capsys.readouterr().out
    assert "metadata.csv: 1 row(s) name no image under a class folder (lines 4)" in printed and "Doe_Jane" not in printed
    metadata.write_bytes("file,subject_id\ntumor/Doe_Jane_0.png,M\u00fcller\n".encode("latin-1"))  # an Excel export
    with pytest.raises(DataError, match="metadata.csv: not UTF-8 text: save it as UTF-8"):
        run(IngestConfig(source=root, out=tmp_path / "m.csv"))


def _volume_cohort(tmp_path: Path) -> Path:
    from components.config import SynthConfig
    from components.synth import run as synth

    out = tmp_path / "synth"
    synth(SynthConfig(out=out, subjects=4, slices_per_subject=1, image_size=32, volumes=True, volume_size=32, seed=5))
    return out / "volumes"


def test_nifti_volumes_become_labelled_slices_with_geometry_columns(tmp_path: Path):
    from components.config import VolumeConfig

    root = _volume_cohort(tmp_path)
    (root / "notumor" / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    config = IngestConfig(
        source=root, out=tmp_path / "m.csv", derived_dir=tmp_path / "derived", volume=VolumeConfig(spacing=(6.0, 6.0, 6.0))
    )
    result = run(config)
    manifest = result.manifest
    assert set(manifest["label"]) == {"tumor", "notumor"} and manifest["subject"].nunique() == 4
    assert (manifest[["spacing_x", "spacing_y", "spacing_z"]] == 6.0).all().all()
    assert set(manifest["source_orientation"]) == {"RAS"} and set(manifest["sequences"]) == {"image"}
    assert all(Path(p).is_file() and Path(p).is_relative_to(tmp_path / "derived") for p in manifest["path"])
    assert list(result.quarantined["file"]) == ["broken"] and "not a readable NIfTI" in result.quarantined["problem"].iloc[0]
    volumes = pd.read_csv(tmp_path / "derived" / "volumes.csv")
    assert len(volumes) == 4 and volumes["has_segmentation"].all() and (volumes["slices"] > 0).all()
    assert all(Path(p).is_file() for p in volumes["path"])


def test_format_is_detected_from_the_layout(tmp_path: Path, tiny_cohort: Path):
    from components.ingest import detect_format

    assert detect_format(_volume_cohort(tmp_path)) == "nifti"
    assert detect_format(tiny_cohort) == "folders"


def _dicom_cohort(root: Path, per_class: int = 2) -> Path:
    from tests.dicom_fixtures import write_series

    for i in range(2 * per_class):
        label = ["notumor", "tumor"][i % 2]
        write_series(root / label / f"export{i}", n_slices=4, series_uid=f"1.2.826.0.1.3680043.10.99.{i}", patient_id=f"MRN-{i:07d}")
    (root / "tumor" / "notes.txt").write_text("not an image")
    return root


def test_dicom_series_become_deidentified_volumes_and_slices(tmp_path: Path):
    from components.config import VolumeConfig
    from tests.dicom_fixtures import PHI

    root = _dicom_cohort(tmp_path / "dicom")
    volume = VolumeConfig(spacing=(0.3125, 0.3125, 2.0), slices_take_volume_label=True)
    config = IngestConfig(
        source=root, format="auto", out=tmp_path / "out" / "m.csv", derived_dir=tmp_path / "out" / "derived", volume=volume
    )
    result = run(config)
    manifest = result.manifest
    assert set(manifest["label"]) == {"tumor", "notumor"} and manifest["subject"].nunique() == 4
    assert set(manifest["modality"]) == {"MR"} and set(manifest["sex"]) == {"F"} and set(manifest["age"]) == {45.0}
    assert list(result.quarantined["file"]) == ["tumor/notes.txt"]
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*.csv"))
    for value in PHI.values():
        assert str(value) not in written
    assert not any("MRN" in p.name for p in (tmp_path / "out").rglob("*"))


def test_a_zip_of_one_unlabelled_dicom_series_becomes_a_volume_for_3d_use(tmp_path: Path):
    from components.config import VolumeConfig
    from components.ingest import detect_format
    from tests.dicom_fixtures import write_series, write_zip

    write_series(tmp_path / "series", n_slices=4)
    archive = write_zip(tmp_path / "upload.zip", tmp_path / "series")
    volume = VolumeConfig(spacing=(0.3125, 0.3125, 2.0))
    config = IngestConfig(source=archive, out=tmp_path / "out" / "m.csv", derived_dir=tmp_path / "out" / "derived", volume=volume)
    assert detect_format(archive) == "dicom"
    volumes_csv = tmp_path / "out" / "derived" / "volumes.csv"
    with pytest.raises(DataError, match="no readable images"):  # unlabelled series: a volume for 3D use, no training slices
        run(config)
    volumes = pd.read_csv(volumes_csv)
    assert len(volumes) == 1 and volumes["spacing_z"].iloc[0] == 2.0 and volumes["modality"].iloc[0] == "MR"


def test_the_manifest_does_not_depend_on_where_the_workspace_lies(tiny_cohort: Path, tmp_path: Path, monkeypatch):
    manifests = []
    for place in ("here", "elsewhere/deeper"):
        workspace = tmp_path / place
        shutil.copytree(tiny_cohort, workspace / "data" / "cohort")
        monkeypatch.chdir(workspace)
        run(IngestConfig(source=Path("data/cohort"), out=Path("data/manifest.csv"), cache_dir=tmp_path / place / "cache"))
        manifests.append((workspace / "data" / "manifest.csv").read_bytes())
    assert manifests[0] == manifests[1]
    paths = pd.read_csv(workspace / "data" / "manifest.csv")["path"]
    assert paths.str.startswith("data/cohort/").all() and all((workspace / path).exists() for path in paths)


def test_images_outside_the_workspace_keep_absolute_paths(tiny_cohort: Path, tmp_path: Path):
    manifest = run(IngestConfig(source=tiny_cohort, out=tmp_path / "m.csv")).manifest
    assert all(Path(path).is_absolute() and Path(path).exists() for path in manifest["path"])
