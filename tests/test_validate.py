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
    assert (tmp_path / "reports" / "result.json").exists()


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
    pd.DataFrame({"file": [f"x{i}.png" for i in range(5)], "problem": "unreadable"}).to_csv(tmp_path / "quarantine.csv", index=False)
    with pytest.raises(TumorScopeError, match="unreadable_fraction"):
        run(ValidateConfig(manifest=bad, report_dir=tmp_path / "reports", min_images=10, max_unreadable_fraction=0.01))
