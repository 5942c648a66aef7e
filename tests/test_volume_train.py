"""The 3D path: a MONAI network learns from tiny synthetic NIfTI volumes, split by subject, tracked in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import NO_TUMOUR, VolumeTrainConfig
from components.errors import DataError

SUBJECTS, VOLUMES_PER_SUBJECT, SHAPE = 12, 2, (24, 26, 22)  # not a cube: resizing keeps the aspect and pads
PROJECT = Path(__file__).resolve().parents[1]


def _volume(rng: np.random.Generator, tumour: bool) -> np.ndarray:
    """(x, y, z, 2 sequences), z-scored-like inside an ellipsoid 'brain', zero outside; a tumour is a bright
    sphere, brighter in the first sequence (FLAIR-like), somewhere off-centre."""
    grid = np.indices(SHAPE).astype(np.float32)
    centre = (np.array(SHAPE) - 1)[:, None, None, None] / 2
    brain = (((grid - centre) / (np.array(SHAPE)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
    image = rng.normal(0, 0.6, (*SHAPE, 2)).astype(np.float32)
    if tumour:
        where = centre[:, 0, 0, 0] + rng.uniform(-4, 4, 3)
        sphere = ((grid - where[:, None, None, None]) ** 2).sum(0) <= rng.uniform(3.5, 5) ** 2
        image[sphere] += np.array([3.0, 1.5], dtype=np.float32)
    return image * brain[..., None]


def write_cohort(folder: Path, seed: int = 0, unlabelled: int = 2) -> Path:
    """volumes.csv as ingest writes it: half the subjects have tumours, each subject two volumes (say two
    visits), plus unlabelled volumes that must be left out."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    rows = []
    for s in range(SUBJECTS):
        label = "glioma" if s % 2 else NO_TUMOUR
        for v in range(VOLUMES_PER_SUBJECT + (unlabelled if s == 0 else 0)):
            volume_id = f"vol-{s:02d}{v}"
            path = folder / "volumes" / f"{volume_id}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(_volume(rng, label != NO_TUMOUR), np.eye(4)), path)
            known = v < VOLUMES_PER_SUBJECT
            rows.append({"volume_id": volume_id, "sequences": "flair+t1", "channels": 2, "subject": f"sub-{s:02d}",
                         "label": label if known else "", "path": str(path.resolve()), "has_segmentation": False})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "volumes.csv", index=False)
    return folder / "volumes.csv"


def small_config(root: Path, volumes: Path, **changes) -> VolumeTrainConfig:
    values = dict(volumes=volumes, out_dir=root / "model", report_dir=root / "reports", cache_dir=root / "cache", spatial_size=24,
                  channels=[8, 16, 16, 32], epochs=10, batch_size=4, learning_rate=3e-3, threads=1, seed=1)  # fmt: skip
    return VolumeTrainConfig(**(values | changes))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    from components.settings import get_settings

    root = tmp_path_factory.mktemp("volume-tracking")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUMORSCOPE_ROOT", str(root))  # artifacts under it, not in the project
        patch.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        get_settings.cache_clear()
        yield f"sqlite:///{root / 'mlflow.db'}"
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tracking):
    """One training run shared by the tests that read its outputs."""
    import time

    from components.volume_train import run

    root = tmp_path_factory.mktemp("volumes")
    config = small_config(root, write_cohort(root))
    started = time.perf_counter()
    result = run(config)
    print(f"3D training took {time.perf_counter() - started:.1f} s")
    return config, result


def test_the_3d_network_learns_a_lesion_and_reports_test_metrics(trained):
    config, result = trained
    metrics = json.loads((config.report_dir / "metrics.json").read_text())
    assert metrics == result
    assert metrics["roc_auc"] >= 0.9, metrics
    assert metrics["test_volumes"] == 6 and metrics["classes"] == ["glioma", NO_TUMOUR]
    assert {"accuracy", "sensitivity", "specificity", "pr_auc"} <= set(metrics)


def test_no_test_subject_trains_and_unlabelled_volumes_are_left_out(trained):
    config, _ = trained
    split = pd.read_csv(config.out_dir / "split.csv")
    parts = {part: set(rows["subject"]) for part, rows in split.groupby("part")}
    assert parts["train"] and parts["test"] and not parts["train"] & parts["test"]
    assert set(split.loc[split["part"] == "test", "label"]) == {"glioma", NO_TUMOUR}, "stratified: both classes are tested"
    assert len(split) == SUBJECTS * VOLUMES_PER_SUBJECT, "unlabelled volumes neither train nor test"
    predictions = pd.read_csv(config.report_dir / "predictions.csv")
    assert set(predictions["volume_id"]) == set(split.loc[split["part"] == "test", "volume_id"])


def test_the_mlflow_run_holds_params_epoch_losses_and_test_metrics(trained, tracking):
    import mlflow

    config, result = trained
    client = mlflow.MlflowClient(tracking)
    run = client.get_run(result["run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name(config.experiment).experiment_id
    assert run.data.params["network"] == "resnet" and run.data.params["test_volumes"] == "6"
    assert run.data.metrics["test_roc_auc"] == pytest.approx(result["roc_auc"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == config.epochs
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "volume_model")}
    assert "volume_model/model.json" in artifacts


def test_the_saved_model_reloads_and_gives_the_reported_probabilities(trained):
    from components.volume_train import load_volume_model, predict_volumes, prepared_volumes

    config, _ = trained
    spec, net = load_volume_model(config.out_dir)
    predictions = pd.read_csv(config.report_dir / "predictions.csv")
    volumes = pd.read_csv(config.volumes).set_index("volume_id").loc[predictions["volume_id"]].reset_index()
    probabilities = predict_volumes(net, prepared_volumes(volumes, spec.spatial_size, config.cache_dir), 4)
    assert spec.in_channels == 2 and spec.sequences == "flair+t1"
    np.testing.assert_allclose(probabilities, predictions[[f"p_{c}" for c in spec.classes]].to_numpy(), atol=1e-5)


def test_both_networks_build_and_classify_a_3d_input():
    import torch

    from components.volume_train import VolumeModelSpec, build_volume_network

    torch.set_num_threads(1)
    resnet = VolumeModelSpec(
        network="resnet", spatial_size=24, channels=[4, 8, 8, 16], blocks=[1, 2, 1, 1], classes=["a", "b"], in_channels=2
    )
    densenet = resnet.model_copy(update={"network": "densenet121", "spatial_size": 32, "classes": ["a", "b", NO_TUMOUR]})
    with torch.inference_mode():
        assert build_volume_network(resnet).eval()(torch.randn(2, 2, 24, 24, 24)).shape == (2, 2)
        assert build_volume_network(densenet).eval()(torch.randn(1, 2, 32, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 32"):
        VolumeTrainConfig(network="densenet121", spatial_size=24)


def test_volumes_become_cubes_without_distorting_their_aspect():
    from components.volume_train import resize_to_cube

    cube = resize_to_cube(np.ones((2, 40, 20, 30), dtype=np.float32), 16)
    assert cube.shape == (2, 16, 16, 16) and cube.dtype == np.float32
    inside = np.argwhere(cube[0] > 0.5)
    assert tuple(inside.max(0) - inside.min(0) + 1) == (16, 8, 12), "longest side to 16, the others scaled alike and zero-padded"


def test_too_few_labelled_volumes_write_a_skipped_result_instead_of_failing(tmp_path):
    from components.volume_train import run

    config = small_config(tmp_path, write_cohort(tmp_path, unlabelled=0), min_volumes=30)
    result = run(config)
    assert "24 labelled volumes" in result["skipped"] and "min_volumes" in result["skipped"]
    assert json.loads((config.report_dir / "metrics.json").read_text()) == result
    assert (config.out_dir / "skipped.json").exists() and not (config.out_dir / "model.pt").exists()
    assert pd.read_csv(config.report_dir / "predictions.csv").empty


def test_without_a_volumes_table_the_stage_skips_fast_and_never_imports_torch(tmp_path):
    script = (
        "import sys; from pathlib import Path; from components.config import VolumeTrainConfig; from components.volume_train import run; "
        f"r = run(VolumeTrainConfig(volumes=Path('absent.csv'), out_dir=Path({str(tmp_path / 'm')!r}), report_dir=Path({str(tmp_path / 'r')!r}))); "
        "print('torch' in sys.modules, r['skipped'])"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip().splitlines()[-1].startswith("False no volumes table")


def test_an_unreadable_volume_is_a_data_error_naming_its_pseudonym_not_its_path(tmp_path, tracking):
    from components.volume_train import run

    volumes = write_cohort(tmp_path, unlabelled=0)
    broken = pd.read_csv(volumes).iloc[5]
    Path(broken["path"]).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable NIfTI") as error:
        run(small_config(tmp_path, volumes, cache_dir=None))
    assert error.value.path == broken["volume_id"] and str(tmp_path) not in str(error.value)
