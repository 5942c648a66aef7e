"""The train stage under DDP: two CPU processes (gloo), launched by Lightning from the stage's own entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_workspace, training_runs, workspace_env

pytestmark = pytest.mark.slow

TINY_DDP = {
    "synth": {"subjects": 24, "image_size": 64},
    "train": {"image_size": 48, "epochs": 2, "batch_size": 8, "channels": [8, 16, 16, 16], "devices": 2},
}


def stage(root: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"components.{name}"], cwd=root, env=workspace_env(root), capture_output=True, text=True, timeout=600
    )


def test_two_process_ddp_trains_an_ensemble_as_one_model_with_one_mlflow_run(tmp_path: Path):
    """Both ranks go through both networks of an ensemble (a rank that skipped one would hang the other), and with
    a time cap, both take the schedule's share of it from rank 0 at every step (a rank that skipped it would hang too)."""
    from components.model import Classifier

    root = make_workspace(tmp_path / "ws", {**TINY_DDP, "train": {**TINY_DDP["train"], "members": 2, "max_minutes": 30}})
    for name in ("synth", "ingest", "validate", "split"):
        assert stage(root, name).returncode == 0
    trained = stage(root, "train")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in trained.stdout + trained.stderr  # Lightning's words for DDP process 2 of 2
    assert [trained.stdout.count(f"member {k}/2: epoch 2/2") for k in (1, 2)] == [1, 1], "only rank 0 reports"
    _, runs = training_runs(root)
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert runs[0].data.params["devices"] == "2"
    assert {"member1-val_loss", "member2-val_loss"} <= set(runs[0].data.metrics)
    assert Classifier.load(root / "models").spec.members == 2


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cached_row_counts(root: Path, masks: bool = False) -> list[int]:
    """Rows of each prepared-image cache (or, with ``masks``, of each lesion-mask cache)."""
    import numpy as np

    paths = [p for p in (root / "data" / "cache").glob("*.npy") if p.name.startswith("masks-") == masks]
    return sorted(len(np.load(path, mmap_mode="r")) for path in paths)


def test_two_nodes_under_torchrun_train_one_model_like_one_process(tmp_path: Path):
    """2 "nodes" × 1 process on 127.0.0.1 (c10d rendezvous, gloo), each started as the stage's own entry with
    num_nodes from params and the endpoint from settings: one model, one MLflow run, each rank caching only its
    own partition, and a validation loss close to the single-process run's (the batches differ, so not identical)."""
    import json

    import pandas as pd

    two_nodes = {**TINY_DDP, "train": {**TINY_DDP["train"], "devices": 1, "num_nodes": 2, "augment": False}}
    root = make_workspace(tmp_path / "ws", two_nodes)
    for name in ("synth", "ingest", "validate", "split"):
        assert stage(root, name).returncode == 0
    env = {**workspace_env(root), "TUMORSCOPE_RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "TUMORSCOPE_RDZV_ID": "tumorscope-test"}
    command = [sys.executable, "-m", "components.train"]
    nodes = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert all("joining a 2-node training job" in o for o in outputs)
    assert sum(o.count("epoch 2/2") for o in outputs) == 1, "only global rank 0 reports"
    client, runs = training_runs(root)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["num_nodes"] == "2"
    assert runs[0].data.params["effective_batch_size"] == "16"
    distributed_loss = runs[0].data.metrics["val_loss"]

    split = pd.read_csv(root / "data" / "split.csv")
    n_train, n_val = (int((split["split"] == part).sum()) for part in ("train", "val"))
    half = lambda n: -(-n // 2)  # noqa: E731
    # rank 0 and rank 1 each prepared their half of train and of val (the whole val set is the calibrate stage's)
    assert _cached_row_counts(root) == sorted([half(n_train), half(n_train), half(n_val), half(n_val)])
    assert _cached_row_counts(root, masks=True) == [half(n_train), half(n_train)], "the lesion masks of each rank's train half"

    params = root / "params.yaml"
    params.write_text(params.read_text().replace("num_nodes: 2", "num_nodes: 1"))
    single = stage(root, "train")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert n_train in _cached_row_counts(root), "one process prepares the whole train split"
    runs = client.search_runs([client.get_experiment_by_name("tumorscope").experiment_id], order_by=["attributes.start_time DESC"])
    assert abs(runs[0].data.metrics["val_loss"] - distributed_loss) < 0.25, json.dumps(
        {"single": runs[0].data.metrics, "two nodes": distributed_loss}
    )
