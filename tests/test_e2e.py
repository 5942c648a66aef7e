"""The whole path with the real tools: Prefect flow over `dvc repro`, MLflow registry,
`bentoml serve` answered over HTTP, Evidently monitoring that retrains on drift."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from tests.conftest import QUICK_REPORTS, make_workspace, workspace_env

pytestmark = pytest.mark.slow

TINY = QUICK_REPORTS | {
    "synth": {"subjects": 60, "slices_per_subject": 2, "image_size": 64},
    "split": {"test_fraction": 0.3},  # a reference of ~36 test images for monitoring
    "train": {"image_size": 48, "epochs": 2, "batch_size": 16, "channels": [8, 16, 32, 32], "patience": 2},
    "register": {
        "min_accuracy": 0.0,
        "min_sensitivity": 0.0,
        "min_specificity": 0.0,
        "min_auc": 0.0,
        "min_subgroup_sensitivity": 0.0,
        "tolerance": 1.0,
    },
    # a small reference: per-column tests on 40 predictions flag a few columns by chance, so the tiny
    # workspace asks for most columns to move (a scanner shift moves all six image statistics)
    "monitor": {"window": 40, "min_samples": 20, "drift_share": 0.6},
}


def tumorscope(root: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "components.cli", *args, "--workdir", str(root)]
    return subprocess.run(command, cwd=root, env=workspace_env(root), capture_output=True, text=True, timeout=900)


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=workspace_env(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("workspace"), TINY)
    result = tumorscope(root, "run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def read(root: Path, name: str) -> dict:
    return json.loads((root / "reports" / name).read_text())


def test_pipeline_trains_registers_and_packages(workspace: Path):
    metrics, gate, package = read(workspace, "metrics.json"), read(workspace, "gate.json"), read(workspace, "package.json")
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert 0.0 <= metrics[name] <= 1.0
    assert gate["promoted"] and gate["candidate_version"] == package["model_version"]
    assert package["bento"].startswith("tumorscope:")
    assert (workspace / "reports" / "validation" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()


def test_mlflow_run_holds_params_epoch_metrics_model_and_champion(workspace: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("tumorscope-synth", "champion")
    run = client.get_run(champion.run_id)  # the calibration's run: the networks, how they answer, the training params
    assert run.data.params["epochs"] == "2" and "data_hash" in run.data.params
    assert run.data.params["target_sensitivity"] == "0.95" and "operating_threshold" in run.data.metrics
    assert "test_roc_auc" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "tumorscope"} <= artifacts
    training = client.get_run(run.data.tags["tumorscope.trained_run"])
    assert training.info.run_id != run.info.run_id and training.info.experiment_id == run.info.experiment_id
    assert len(client.get_metric_history(training.info.run_id, "val_loss")) == 2


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_nothing_changed_is_a_no_op_and_a_train_param_reruns_train_onward(workspace: Path):
    # the feedback stage always runs (it reads the prediction log); with no new labels nothing after it does
    assert ran(dvc(workspace, "repro")) == {"feedback"}
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 2\n", "epochs: 3\n", 1))  # train's (pretrain's are 24)
    assert yaml.safe_load(params.read_text())["train"]["epochs"] == 3
    assert ran(dvc(workspace, "repro")) == {"feedback", "train", "calibrate", "evaluate", "register", "package"}


def test_a_new_operating_point_or_mirror_averaging_recalibrates_the_same_networks_without_training(workspace: Path):
    import mlflow

    networks = (workspace / "models" / "model.pt").read_bytes()
    before = json.loads((workspace / "models_calibrated" / "model.json").read_text())
    params = workspace / "params.yaml"
    answering = params.read_text().replace("specificity_floor: 0.85", "specificity_floor: 0.97")
    params.write_text(answering.replace("flip_averaging: false", "flip_averaging: true"))
    assert ran(dvc(workspace, "repro")) == {"feedback", "calibrate", "evaluate", "register", "package"}
    after = json.loads((workspace / "models_calibrated" / "model.json").read_text())
    assert after["flip_averaging"] and not before["flip_averaging"], "mirror averaging is how they answer, not a weight"
    assert (workspace / "models" / "model.pt").read_bytes() == networks
    assert after["trained_run_id"] == before["trained_run_id"] and after["run_id"] != before["run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(after["run_id"])
    assert run.data.metrics["val_specificity_at_threshold"] >= 0.97, "the threshold honours the new floor"
    assert run.data.params["specificity_floor"] == "0.97" and run.data.tags["tumorscope.trained_run"] == before["trained_run_id"]
    assert read(workspace, "gate.json")["run_id"] == after["run_id"], "the gate judged the new calibration"


def test_batch_prediction_writes_one_row_per_image_with_class_probabilities(workspace: Path, tmp_path: Path):
    out = tmp_path / "preds.csv"
    folder = workspace / "data" / "synth" / "tumor"
    result = tumorscope(workspace, "predict", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    predictions = pd.read_csv(out)
    assert list(predictions.columns) == ["path", "predicted_label", "confidence", "prob_notumor", "prob_tumor"]
    assert len(predictions) == len(list(folder.glob("*.png")))
    assert ((predictions["prob_notumor"] + predictions["prob_tumor"]) - 1).abs().max() < 1e-4
    missing = tumorscope(workspace, "predict", str(tmp_path / "nothing.png"))
    assert missing.returncode == 2 and "nothing.png: not found" in missing.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    wrong = tumorscope(workspace, "predict", str(notes))
    assert wrong.returncode == 2 and "not an image (png, jpg, tif), a NIfTI volume" in wrong.stderr


def test_batch_prediction_predicts_every_readable_file_and_lists_the_others(workspace: Path, tmp_path: Path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for image in sorted((workspace / "data" / "synth" / "tumor").glob("*.png"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = tumorscope(workspace, "predict", str(folder), "--out", str(tmp_path / "preds.csv"))
    assert result.returncode == 1, "a script must notice the files left out"
    assert len(pd.read_csv(tmp_path / "preds.csv")) == 3
    listed = pd.read_csv(tmp_path / "preds.unreadable.csv")
    assert listed["path"].tolist() == [str(folder / "truncated.png")] and "not a readable image" in listed["problem"][0]
    assert "truncated.png: not a readable image" in result.stderr and "Traceback" not in result.stderr


def test_metrics_and_plots_show(workspace: Path):
    assert "roc_auc" in dvc(workspace, "metrics", "show")
    plots = json.loads(dvc(workspace, "plots", "show", "--json"))
    assert any("roc.csv" in key for key in plots["data"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(workspace: Path):
    port = _free_port()
    bento = read(workspace, "package.json")["bento"]
    env = workspace_env(workspace) | {"BENTOML_HOME": str(workspace / ".bentoml"), "TUMORSCOPE_MAX_UPLOAD_BYTES": "200000"}
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("bentoml serve did not become ready in 90 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def post(url: str, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        return httpx.post(f"{url}/predict", files={"image": (path.name, handle)}, timeout=30)


def test_endpoint_answers_with_label_probabilities_and_version(workspace: Path, endpoint: str):
    image = next((workspace / "data" / "synth" / "tumor").glob("*.png"))
    response = post(endpoint, image)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in {"notumor", "tumor"}
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert answer["model_version"] == read(workspace, "package.json")["model_version"]
    with sqlite3.connect(workspace / "data" / "predictions.sqlite") as db:
        row = db.execute("SELECT * FROM predictions WHERE prediction_id = ?", (answer["prediction_id"],)).fetchone()
    assert row is not None and image.name not in json.dumps(row) and image.stem not in json.dumps(row)


def test_served_bento_carries_its_model_card_and_calibration(workspace: Path, endpoint: str):
    model = httpx.get(f"{endpoint}/model", timeout=10).json()
    card, metrics = model["card"], read(workspace, "metrics.json")
    assert card["model_version"] == model["model_version"] == read(workspace, "package.json")["model_version"]
    assert card["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"]) and card["subgroups"]
    assert model["thresholds"]["operating_threshold"] == pytest.approx(card["calibration"]["operating_threshold"])
    assert "## Intended use" in next((workspace / ".bentoml" / "models").rglob("model_card.md")).read_text()


def test_built_bento_serves_every_route(workspace: Path, endpoint: str):
    """The built bento (not the source tree) answers the batch, explanation and page routes too."""
    image = next((workspace / "data" / "synth" / "tumor").glob("*.png"))
    explained = httpx.post(f"{endpoint}/explain", files={"image": ("s.png", image.read_bytes())}, timeout=60)
    assert explained.status_code == 200 and len(explained.json()["heatmap"]) == TINY["train"]["image_size"]
    batch = httpx.post(f"{endpoint}/predict_batch", files=[("images", ("a.png", image.read_bytes()))] * 2, timeout=60)
    assert batch.status_code == 200 and [a["label"] for a in batch.json()] == [explained.json()["label"]] * 2
    page = httpx.get(f"{endpoint}/", timeout=10)
    assert page.status_code == 200 and "<title>TumorScope</title>" in page.text


def test_feedback_and_subgroups_are_recorded(workspace: Path, endpoint: str):
    image = next((workspace / "data" / "synth" / "notumor").glob("*.png"))
    with image.open("rb") as handle:
        answer = httpx.post(
            f"{endpoint}/predict", files={"image": (image.name, handle)}, data={"sex": "F", "age_band": "60+", "site": "site-A"}, timeout=30
        )
    prediction_id = answer.json()["prediction_id"]
    stored = httpx.post(f"{endpoint}/feedback", json={"prediction_id": prediction_id, "label": "notumor"}, timeout=30)
    assert stored.status_code == 200 and stored.json()["stored"]
    assert httpx.post(f"{endpoint}/feedback", json={"prediction_id": "nope", "label": "notumor"}, timeout=30).status_code == 404
    assert httpx.post(f"{endpoint}/feedback", json={"prediction_id": prediction_id, "label": "cat"}, timeout=30).status_code == 422
    with sqlite3.connect(workspace / "data" / "predictions.sqlite") as db:
        row = db.execute("SELECT sex, age_band, feedback_label FROM predictions WHERE prediction_id = ?", (prediction_id,)).fetchone()
    assert row == ("F", "60+", "notumor")
    with image.open("rb") as handle:
        free_text = httpx.post(
            f"{endpoint}/predict", files={"image": (image.name, handle)}, data={"site": "Jane Doe, MRN 12345"}, timeout=30
        )
    assert free_text.status_code == 422 and "site" in free_text.text


def test_bad_uploads_get_clear_4xx(endpoint: str, tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000)
    assert post(endpoint, text).status_code == 415
    response = post(endpoint, broken)
    assert response.status_code == 422 and "not a readable image" in response.text
    assert post(endpoint, huge).status_code == 413
    with broken.open("rb") as handle:
        misnamed = httpx.post(f"{endpoint}/predict", files={"file": ("x.png", handle)}, timeout=30)
    assert misnamed.status_code == 400 and "field named 'image'" in misnamed.text
    assert httpx.post(f"{endpoint}/predict", json={"image": "nope"}, timeout=30).status_code < 500
    assert httpx.get(f"{endpoint}/readyz", timeout=5).status_code == 200


def _send_cohort(url: str, folder: Path, count: int, feedback: bool = False) -> None:
    """POST ``count`` slices; with ``feedback``, a clinician confirms each with its true label (its class folder)."""
    images = sorted(folder.glob("*/*.png"))
    images = [p for p in images if p.parent.name != "masks"][:count]
    for image in images:
        answer = post(url, image)
        assert answer.status_code == 200
        if feedback:
            labelled = httpx.post(
                f"{url}/feedback", json={"prediction_id": answer.json()["prediction_id"], "label": image.parent.name}, timeout=30
            )
            assert labelled.status_code == 200


def _last_decision_entry(root: Path) -> dict:
    return json.loads((root / "reports" / "monitoring" / "decisions.jsonl").read_text().splitlines()[-1])


def test_monitoring_retrains_on_shifted_traffic_only(workspace: Path, endpoint: str, tmp_path: Path):
    from components.config import SynthConfig
    from components.synth import run as synthesise
    from flows.training import workspace_lock

    synthesise(SynthConfig(out=tmp_path / "same", subjects=40, slices_per_subject=1, image_size=64, seed=101))
    synthesise(SynthConfig(out=tmp_path / "shifted", subjects=24, image_size=64, seed=102, shift="scanner"))
    version_before = read(workspace, "gate.json")["candidate_version"]
    served = read(workspace, "package.json")["model_version"]

    _send_cohort(endpoint, tmp_path / "same", 40)
    quiet = tumorscope(workspace, "monitor")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "no retraining" in quiet.stdout
    assert read(workspace, "gate.json")["candidate_version"] == version_before

    test_before = set(pd.read_csv(workspace / "data" / "split.csv").query("split == 'test'")["image_id"])
    _send_cohort(endpoint, tmp_path / "shifted", 40, feedback=True)
    with workspace_lock(workspace):  # a manual run holds the workspace: the retraining it calls for is refused
        busy = tumorscope(workspace, "monitor", "--service-url", endpoint)
    assert busy.returncode == 2 and "retraining failed: another pipeline run is using" in busy.stderr, busy.stderr[-2000:]
    assert read(workspace, "gate.json")["candidate_version"] == version_before
    assert _last_decision_entry(workspace)["retraining"] == "workspace busy"
    drifted = tumorscope(workspace, "monitor", "--service-url", endpoint)  # no cooldown: nothing was retrained
    assert drifted.returncode == 0, drifted.stdout[-3000:] + drifted.stderr[-3000:]
    assert "retrained" in drifted.stdout
    decision = json.loads((workspace / "reports" / "monitoring" / "decision.json").read_text())
    assert decision["retrain"] and "mean" in decision["drifted_columns"]
    assert decision["model_version"] == served, "compared with the serving champion's own reference"
    assert decision["embedding_drifted_share"] is not None and decision["feedback_quality"]["accuracy"] is not None
    for report in ("drift.html", "embedding-drift.html", "quality.html"):
        assert (workspace / "reports" / "monitoring" / report).stat().st_size > 10_000
    gate = read(workspace, "gate.json")
    assert int(gate["candidate_version"]) > int(version_before) and gate["promoted"]
    ended = _last_decision_entry(workspace)  # what the next check's cooldown reads
    assert ended["retraining"] == "reached the gate" and ended["candidate_version"] == gate["candidate_version"]
    # the labelled traffic became a new data version, used for training only: the test split did not move
    with sqlite3.connect(workspace / "data" / "predictions.sqlite") as db:
        labelled = db.execute("SELECT COUNT(*) FROM predictions WHERE feedback_label IS NOT NULL").fetchone()[0]
    assert labelled >= 40 and len(list((workspace / "data" / "feedback").rglob("*.png"))) == labelled
    assert "data/feedback" in (workspace / "dvc.lock").read_text()
    split = pd.read_csv(workspace / "data" / "split.csv")
    assert set(split.loc[split["origin"] == "feedback", "split"]) == {"train"}
    assert set(split.query("split == 'test'")["image_id"]) == test_before
    # and the running endpoint reloaded the new champion without a restart
    answer = post(endpoint, next((tmp_path / "same" / "tumor").glob("*.png"))).json()
    assert answer["model_version"] == gate["candidate_version"] != served


def test_bad_data_stops_the_flow_with_one_clear_line_and_no_traceback(tmp_path: Path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    root = make_workspace(tmp_path / "ws", {"ingest": {"source": str(empty)}})
    result = tumorscope(root, "run")
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"error: stage 'ingest' failed: {empty}: no class folders with images found" in result.stderr
    assert "Traceback" not in output


def test_dvc_experiments_sweep_a_param_and_record_each_run(workspace: Path):
    identity = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    env = workspace_env(workspace) | identity
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(command, cwd=workspace, env=env, check=True, capture_output=True)
    for top_k in (5, 8):
        run = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "run", "-S", f"features.top_k={top_k}"],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Running stage 'features'" in run.stdout and "Running stage 'train'" not in run.stdout
        assert len(json.loads((workspace / "reports" / "features" / "selected.json").read_text())["features"]) == top_k
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=workspace, env=env, capture_output=True, text=True)
    experiments = [e for commit in json.loads(shown.stdout) for e in (commit.get("experiments") or [])]
    swept = {e["revs"][0]["data"]["params"]["params.yaml"]["data"]["features"]["top_k"] for e in experiments}
    assert swept == {5, 8}
