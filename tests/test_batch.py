"""Batch prediction over slices and NIfTI volumes with a local model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.batch import predict_files
from components.model import Classifier, ModelSpec, build_network
from tests.test_volumes import _head, _save


def test_a_volume_gives_one_row_per_brain_slice_and_one_for_the_volume(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # no params.yaml here: default volume preprocessing
    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    Classifier.from_weights(spec, build_network(spec).state_dict()).save(tmp_path / "model")
    volume = _save(tmp_path / "scan.nii.gz", _head())
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    rows = predict_files([volume, tmp_path / "slice.png"], model=str(tmp_path / "model")).rows
    assert list(rows.columns) == ["path", "predicted_label", "confidence", "prob_notumor", "prob_tumor"]
    slices = rows[rows["path"].str.startswith(f"{volume}#z")]
    whole = rows[rows["path"] == str(volume)]
    assert len(slices) >= 5 and len(whole) == 1 and (rows["path"] == str(tmp_path / "slice.png")).sum() == 1
    assert float(whole["prob_tumor"].iloc[0]) == slices["prob_tumor"].astype(float).max(), "the most suspicious slice speaks for the volume"
    assert np.allclose(rows[["prob_notumor", "prob_tumor"]].astype(float).sum(axis=1), 1, atol=1e-5)


def test_a_zipped_dicom_series_is_predicted_like_a_volume(tmp_path: Path, monkeypatch):
    import torch

    from tests.dicom_fixtures import write_series, write_zip

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    Classifier.from_weights(spec, build_network(spec).state_dict()).save(tmp_path / "model")
    write_series(tmp_path / "series", n_slices=6)
    archive = write_zip(tmp_path / "series.zip", tmp_path / "series")
    rows = predict_files([archive], model=str(tmp_path / "model")).rows
    assert (rows["path"] == str(archive)).sum() == 1 and rows["path"].str.startswith(f"{archive}#z").sum() >= 1


def test_unreadable_files_are_listed_with_their_problem_and_the_rest_predicted(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    Classifier.from_weights(spec, build_network(spec).state_dict()).save(tmp_path / "model")
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    predicted = predict_files([tmp_path / "slice.png", tmp_path / "cut.jpg", tmp_path / "broken.nii.gz"], model=str(tmp_path / "model"))
    assert predicted.rows["path"].tolist() == [str(tmp_path / "slice.png")]
    problems = {Path(exc.path).name: exc.problem for exc in predicted.unreadable}
    assert sorted(problems) == ["broken.nii.gz", "cut.jpg"] and problems["broken.nii.gz"] == "a gzip file that cannot be decompressed"
    assert problems["cut.jpg"].startswith("not a readable image")


def test_a_folder_of_dicom_series_is_predicted_a_series_at_a_time_whatever_the_file_names(tmp_path: Path, monkeypatch):
    import torch

    from tests.dicom_fixtures import fixed_uid, write_series

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["notumor", "tumor"])
    Classifier.from_weights(spec, build_network(spec).state_dict()).save(tmp_path / "model")
    study = tmp_path / "study"
    write_series(study / "t1", n_slices=6)  # files IM0001…: no suffix, as exports often are
    write_series(study / "t2", n_slices=5, series_uid=fixed_uid("second"), description="AX T2")
    (study / "t1" / "IM0099").write_bytes(b"\0" * 128 + b"DICM" + b"cut short")
    predicted = predict_files([study], model=str(tmp_path / "model"))
    volumes = predicted.rows[~predicted.rows["path"].str.contains("#z")]["path"].tolist()
    assert sorted(volumes) == [f"{study / 't1'}#series1", f"{study / 't2'}#series1"], "one row per series, named by its folder"
    assert predicted.rows["path"].str.startswith(f"{study / 't1'}#series1#z").sum() >= 1
    assert [Path(exc.path).name for exc in predicted.unreadable] == ["IM0099"]
