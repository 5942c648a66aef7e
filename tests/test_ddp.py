"""The train stage under DDP: two CPU processes (gloo), launched by Lightning from the stage's own entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_workspace, workspace_env

pytestmark = pytest.mark.slow

TINY_DDP = {
    "synth": {"subjects": 24, "image_size": 64},
    "train": {"image_size": 48, "epochs": 2, "batch_size": 8, "channels": [8, 16, 16, 16], "devices": 2},
}


def stage(root: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"components.{name}"], cwd=root, env=workspace_env(root), capture_output=True, text=True, timeout=600
    )


def test_two_process_ddp_trains_one_model_with_one_mlflow_run(tmp_path: Path):
    import mlflow

    root = make_workspace(tmp_path / "ws", TINY_DDP)
    for name in ("synth", "ingest", "validate", "split"):
        assert stage(root, name).returncode == 0
    trained = stage(root, "train")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in trained.stdout + trained.stderr
    assert trained.stdout.count("epoch 2/2") == 1, "only rank 0 reports"
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tumorscope").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["devices"] == "2"
    assert (root / "models" / "model.pt").exists()
