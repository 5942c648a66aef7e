from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import components.features as features
from components.config import FeaturesConfig
from components.errors import DataError
from components.imaging import read_slice
from components.radiomics import FEATURE_NAMES


def _split(cohort: Path) -> pd.DataFrame:
    """A split table as the split stage writes it: subjects whole, both labels in train."""
    rows = []
    for image in sorted(cohort.glob("*tumor/*.png")):
        subject = image.stem.rsplit("-", 1)[0]
        mask = cohort / "masks" / image.name
        rows.append(
            {
                "image_id": f"img-{image.stem}",
                "subject": f"sub-{subject}",
                "label": image.parent.name,
                "path": str(image),
                "mask_path": str(mask) if mask.exists() else "",
            }
        )
    split = pd.DataFrame(rows)
    order = pd.factorize(split["subject"])[0]
    split["split"] = np.select([order % 4 == 1, order % 4 == 3], ["val", "test"], "train")
    return split


@pytest.fixture
def config(tiny_cohort: Path, tmp_path: Path) -> FeaturesConfig:
    _split(tiny_cohort).to_csv(tmp_path / "split.csv", index=False)
    return FeaturesConfig(
        split=tmp_path / "split.csv", out=tmp_path / "features.csv", report_dir=tmp_path / "reports", image_size=64, top_k=5
    )


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every file the stage reads."""
    seen: list[str] = []

    def counting(path, name=None):
        seen.append(str(path))
        return read_slice(path, name)

    monkeypatch.setattr(features, "read_slice", counting)
    return seen


def test_run_writes_one_row_per_image_without_paths(config: FeaturesConfig, capsys):
    split = pd.read_csv(config.split)
    result = features.run(config)
    table = pd.read_csv(config.out)
    assert len(table) == len(split) == len(result.table)
    assert list(table.columns) == ["image_id", "subject", "label", "split", *FEATURE_NAMES]
    assert not any("path" in column for column in table.columns)
    assert table["image_id"].tolist() == split["image_id"].tolist()
    tumour = table["label"] == "tumor"
    assert table.loc[tumour, "lesion_area_fraction"].notna().all() and table.loc[~tumour, "lesion_area_fraction"].isna().all()
    chosen = json.loads((config.report_dir / "selected.json").read_text())
    assert chosen["top_k"] == 5 and len(chosen["features"]) == 5 and chosen["methods"] == ["anova", "rfe", "l1", "tree"]
    selection = pd.read_csv(config.report_dir / "selection.csv")
    assert selection.loc[selection["selected"], "feature"].tolist() == chosen["features"]
    assert not selection["feature"].str.startswith("lesion_").any()  # ground truth in disguise: not ranked
    assert f"{len(split)} images" in capsys.readouterr().out


def test_selection_uses_train_rows_only(config: FeaturesConfig, tmp_path: Path):
    first = features.run(config).selection
    split = pd.read_csv(config.split)
    held_out = split["split"] != "train"
    split.loc[held_out, "label"] = split.loc[held_out, "label"].map({"tumor": "notumor", "notumor": "tumor"})
    split.to_csv(config.split, index=False)
    second = features.run(config.model_copy(update={"report_dir": tmp_path / "again"})).selection
    pd.testing.assert_frame_equal(first, second)


def test_rerun_over_unchanged_images_reads_nothing(config: FeaturesConfig, reads: list[str]):
    first = features.run(config).table
    n_images = len(first)
    n_masks = pd.read_csv(config.split)["mask_path"].notna().sum()
    assert len(reads) == n_images + n_masks
    reads.clear()
    second = features.run(config).table
    assert reads == []
    pd.testing.assert_frame_equal(first, second)
    features.run(config.model_copy(update={"levels": 16}))
    assert len(reads) == n_images + n_masks  # another setting: computed afresh


def test_a_changed_image_is_read_again(config: FeaturesConfig, reads: list[str]):
    features.run(config)
    reads.clear()
    path = Path(pd.read_csv(config.split)["path"].iloc[0])
    copy = config.split.parent / "changed.png"
    copy.write_bytes(path.read_bytes())
    split = pd.read_csv(config.split)
    split.loc[0, "path"] = str(copy)
    split.to_csv(config.split, index=False)
    features.run(config)
    assert reads == [str(copy)] + ([split.loc[0, "mask_path"]] if isinstance(split.loc[0, "mask_path"], str) else [])


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_image_is_a_data_error_naming_it_by_pseudonym(config: FeaturesConfig, tmp_path: Path, damage: str):
    split = pd.read_csv(config.split)
    bad = tmp_path / "bad.png"
    if damage == "corrupt":
        bad.write_bytes(b"not a png")
    split.loc[3, "path"] = str(bad)
    split.to_csv(config.split, index=False)
    with pytest.raises(DataError) as caught:
        features.run(config)
    assert caught.value.path == split.loc[3, "image_id"] and "bad.png" not in str(caught.value)


def test_missing_split_says_which_stage_to_run(tmp_path: Path):
    with pytest.raises(DataError, match="run the split stage"):
        features.run(FeaturesConfig(split=tmp_path / "nope.csv", out=tmp_path / "f.csv", report_dir=tmp_path / "r"))
