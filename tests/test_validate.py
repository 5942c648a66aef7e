import json
from pathlib import Path

import pandas as pd
import pytest

from components.config import IngestConfig, ValidateConfig
from components.errors import TumorScopeError
from components.ingest import run as ingest
from components.validate import run


@pytest.fixture(scope="module")
def manifest(tiny_cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "manifest.csv"
    ingest(IngestConfig(source=tiny_cohort, out=out))
    return out


def test_good_manifest_passes_with_data_docs(manifest: Path, tmp_path: Path):
    outcome = run(ValidateConfig(manifest=manifest, report_dir=tmp_path / "reports", min_images=10))
    assert outcome.success and outcome.evaluated >= 15 and not outcome.failures
    assert Path(outcome.data_docs.removeprefix("file://")).exists()
    stored = json.loads((tmp_path / "reports" / "result.json").read_text())
    assert stored["data_docs"] == "gx/uncommitted/data_docs/local_site/index.html", "relative: the same in every clone"
    assert (tmp_path / "reports" / stored["data_docs"]).exists()


def test_series_slices_without_volume_geometry_are_not_held_to_the_volume_checks(manifest: Path, tmp_path: Path):
    frame = pd.read_csv(manifest)
    series = tmp_path / "manifest.csv"  # as LGG's studies: a volume pseudonym and slice numbers, no preprocessing geometry
    frame.assign(volume_id=frame["subject"].str.replace("sub-", "vol-"), slice_index=range(len(frame))).to_csv(series, index=False)
    outcome = run(ValidateConfig(manifest=series, report_dir=tmp_path / "reports", min_images=10))
    assert outcome.success and not outcome.failures


def test_single_class_and_blank_images_stop_the_pipeline_with_reasons(manifest: Path, tmp_path: Path):
    frame = pd.read_csv(manifest)
    frame = frame[frame["label"] == "tumor"].assign(std=0.0)
    bad = tmp_path / "manifest.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(TumorScopeError) as error:
        run(ValidateConfig(manifest=bad, report_dir=tmp_path / "reports", min_images=10))
    message = str(error.value)
    assert "data validation failed" in message
    assert "std" in message and "notumor" in message
    assert (tmp_path / "reports" / "gx").exists()


def test_too_many_unreadable_files_fail(manifest: Path, tmp_path: Path):
    bad = tmp_path / "manifest.csv"
    pd.read_csv(manifest).to_csv(bad, index=False)
    quarantine = pd.DataFrame(
        {"image_id": [f"img-{i}" for i in range(5)], "file": [f"x{i}.png" for i in range(5)], "problem": "unreadable"}
    )
    quarantine.to_csv(tmp_path / "quarantine.csv", index=False)
    with pytest.raises(TumorScopeError, match="unreadable_fraction"):
        run(ValidateConfig(manifest=bad, report_dir=tmp_path / "reports", min_images=10, max_unreadable_fraction=0.01))


def test_label_conflicts_are_gated_by_their_own_share_not_as_unreadable_files(manifest: Path, tmp_path: Path):
    data = tmp_path / "manifest.csv"
    pd.read_csv(manifest).to_csv(data, index=False)
    pd.DataFrame(
        {"image_id": ["img-a", "img-b"], "file": ["a.png", "b.png"], "kind": "label_conflict", "problem": "an exact copy of it ..."}
    ).to_csv(tmp_path / "quarantine.csv", index=False)
    config = ValidateConfig(manifest=data, report_dir=tmp_path / "reports", min_images=10, max_unreadable_fraction=0.0)
    assert run(config.model_copy(update={"max_label_conflict_fraction": 0.5})).success
    with pytest.raises(TumorScopeError, match="label_conflict_fraction"):
        run(config.model_copy(update={"max_label_conflict_fraction": 0.001}))


def test_a_few_quarantined_files_are_listed_in_the_qc_table_and_do_not_stop_the_run(manifest: Path, tmp_path: Path):
    good = tmp_path / "manifest.csv"
    pd.read_csv(manifest).to_csv(good, index=False)
    pd.DataFrame({"image_id": ["img-x"], "file": ["secret/x.png"], "problem": "not a readable image"}).to_csv(
        tmp_path / "quarantine.csv", index=False
    )
    outcome = run(ValidateConfig(manifest=good, report_dir=tmp_path / "reports", min_images=10, max_unreadable_fraction=0.05))
    assert outcome.success and outcome.quarantined == [{"image_id": "img-x", "problem": "not a readable image"}]
    qc = pd.read_csv(tmp_path / "reports" / "qc.csv")
    assert len(qc) == len(pd.read_csv(good)) + 1 and set(qc["status"]) == {"ok", "quarantined"}
    assert "secret" not in (tmp_path / "reports" / "result.json").read_text() + (tmp_path / "reports" / "qc.csv").read_text()


@pytest.fixture(scope="module")
def volume_manifest(tmp_path_factory) -> Path:
    from components.config import SynthConfig, VolumeConfig
    from components.synth import run as synth

    root = tmp_path_factory.mktemp("volumes")
    synth(SynthConfig(out=root / "synth", subjects=4, slices_per_subject=1, image_size=32, volumes=True, volume_size=32, seed=2))
    out = root / "manifest.csv"
    ingest(
        IngestConfig(source=root / "synth" / "volumes", out=out, derived_dir=root / "derived", volume=VolumeConfig(spacing=(6.0, 6.0, 6.0)))
    )
    return out


def test_volume_slices_pass_geometry_checks_and_fail_on_mixed_spacing_or_missing_sequences(volume_manifest: Path, tmp_path: Path):
    assert run(ValidateConfig(manifest=volume_manifest, report_dir=tmp_path / "ok", min_images=10, min_image_side=16)).success
    with pytest.raises(TumorScopeError, match="sequences"):
        run(
            ValidateConfig(
                manifest=volume_manifest, report_dir=tmp_path / "seq", min_images=10, min_image_side=16, required_sequences=["flair"]
            )
        )
    mixed = tmp_path / "manifest.csv"
    frame = pd.read_csv(volume_manifest)
    frame.loc[frame.index[: len(frame) // 2], "spacing_z"] = 3.0  # half the slices not resampled
    frame.to_csv(mixed, index=False)
    with pytest.raises(TumorScopeError, match="spacing_z"):
        run(ValidateConfig(manifest=mixed, report_dir=tmp_path / "mixed", min_images=10, min_image_side=16))
