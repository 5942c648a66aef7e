"""The feedback stage: labelled served slices become class folders (a DVC data version), only for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import FeedbackConfig, IngestConfig
from components.feedback import run
from components.predictions import PredictionLog


@pytest.fixture
def served(tmp_path: Path, monkeypatch) -> Path:
    """A prediction log of five predictions (three labelled, one of those without a kept image) and its image store."""
    monkeypatch.setenv("TUMORSCOPE_PREDICTION_LOG", str(tmp_path / "log.sqlite"))
    monkeypatch.setenv("TUMORSCOPE_IMAGE_STORE", str(tmp_path / "served"))
    from components.settings import get_settings

    get_settings.cache_clear()
    log = PredictionLog(tmp_path / "log.sqlite")
    (tmp_path / "served").mkdir()
    for i in range(5):
        log.append({"prediction_id": f"p{i}", "time": f"2026-11-30T00:00:0{i}", "predicted_label": "tumor", "site": "site-D", "sex": "F"})
        if i != 2:
            pixels = (np.random.default_rng(i).random((48, 48)) * 65535).astype(np.uint16)
            Image.fromarray(pixels).save(tmp_path / "served" / f"p{i}.png")
    for i, label in ((0, "tumor"), (1, "notumor"), (2, "tumor")):
        assert log.add_feedback(f"p{i}", label, "2026-11-30T01:00:00")
    yield tmp_path
    get_settings.cache_clear()


def test_labelled_slices_with_kept_images_are_exported_as_class_folders(served: Path):
    result = run(FeedbackConfig(), served / "feedback")
    assert result.exported == 2 and result.missing_images == 1 and result.labels == {"tumor": 1, "notumor": 1}
    assert sorted(p.relative_to(served / "feedback").as_posix() for p in (served / "feedback").rglob("*.png")) == [
        "notumor/p1.png",
        "tumor/p0.png",
    ]
    metadata = pd.read_csv(served / "feedback" / "metadata.csv")
    assert set(metadata["site"]) == {"site-D"} and list(metadata.columns) == ["file", "sex", "site"]


def test_too_few_labels_export_nothing_yet(served: Path):
    assert run(FeedbackConfig(min_labels=10), served / "feedback").exported == 0
    assert not list((served / "feedback").rglob("*.png"))


def test_ingest_adds_feedback_images_marked_for_training_only(served: Path, tiny_cohort: Path):
    from components.ingest import run as ingest

    run(FeedbackConfig(), served / "feedback")
    manifest = ingest(IngestConfig(source=tiny_cohort, out=served / "m.csv", feedback_dir=served / "feedback")).manifest
    feedback = manifest[manifest["origin"] == "feedback"]
    assert len(feedback) == 2 and set(feedback["site"]) == {"site-D"}
    assert (manifest["origin"] == "source").sum() == 32
