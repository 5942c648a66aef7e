"""The train stage's distribution logic: each rank's own partition, and how a node joins a multi-node job."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import CalibrateConfig, TrainConfig
from components.errors import TumorScopeError
from components.settings import get_settings
from components.train import rank_partition, torchrun_command
from tests.conftest import training_runs


def test_rank_partitions_are_equal_sized_and_cover_every_row():
    rows = pd.DataFrame({"image_id": [f"im{i}" for i in range(11)]})
    shares = [rank_partition(rows, rank, 3, shuffle=True, seed=7) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 4, 4]  # padded by repetition: DDP needs equal steps per rank
    seen = pd.concat(shares)["image_id"]
    assert set(seen) == set(rows["image_id"]) and seen.duplicated().sum() == 1
    assert rank_partition(rows, 0, 1, shuffle=True, seed=7) is rows


def test_train_shares_are_shuffled_reproducibly_and_val_shares_keep_order():
    rows = pd.DataFrame({"image_id": range(20)})
    first = rank_partition(rows, 0, 2, shuffle=True, seed=1)["image_id"].tolist()
    assert first == rank_partition(rows, 0, 2, shuffle=True, seed=1)["image_id"].tolist()
    assert first != sorted(first)
    assert rank_partition(rows, 1, 2, shuffle=False, seed=1)["image_id"].tolist() == list(range(1, 20, 2))


def test_linear_lr_scaling_follows_the_world_size():
    assert TrainConfig(devices=2, num_nodes=2, lr_scaling="linear", learning_rate=0.001).effective_learning_rate == pytest.approx(0.004)
    assert TrainConfig(devices=2, num_nodes=2, learning_rate=0.001).effective_learning_rate == pytest.approx(0.001)


@pytest.fixture
def settings_env(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_one_node_trains_in_process(settings_env):
    assert torchrun_command(TrainConfig(devices=2)) is None


def test_multi_node_needs_the_rendezvous_endpoint(settings_env):
    settings_env.delenv("TUMORSCOPE_RDZV_ENDPOINT", raising=False)
    with pytest.raises(TumorScopeError, match="TUMORSCOPE_RDZV_ENDPOINT"):
        torchrun_command(TrainConfig(num_nodes=2))


def test_multi_node_joins_through_torchrun_and_not_twice(settings_env):
    settings_env.setenv("TUMORSCOPE_RDZV_ENDPOINT", "node0:29400")
    command = torchrun_command(TrainConfig(num_nodes=3, devices=2))
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert ["--nnodes", "3"] == command[3:5] and "--rdzv-endpoint" in command and "node0:29400" in command
    settings_env.setenv("TORCHELASTIC_RUN_ID", "job")
    assert torchrun_command(TrainConfig(num_nodes=3)) is None


def test_initial_weights_load_where_names_and_shapes_match(tmp_path):
    import torch

    from components.errors import DataError
    from components.model import ModelSpec, build_network, one_network
    from components.train import load_initial_weights

    spec = ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["a", "b"])
    donor = build_network(spec)
    torch.save({"state_dict": {f"net.{k}": v for k, v in donor.state_dict().items()}}, tmp_path / "donor.ckpt")
    three_classes = build_network(spec.model_copy(update={"classes": ["a", "b", "c"]}))
    loaded = load_initial_weights(three_classes, tmp_path / "donor.ckpt")
    message = loaded.message
    assert "conv1.weight" in loaded.names and "fc.weight" not in loaded.names, "the names say which tensors came from the file"
    assert torch.equal(three_classes.conv1.weight, donor.conv1.weight)
    assert three_classes.fc.weight.shape[0] == 3, "the head for other classes keeps its own initialisation"
    assert message.startswith("initial weights:") and "of" in message
    ensemble = one_network([build_network(spec), donor])  # network 2 of a new ensemble starts from member 2, and so on
    torch.save(ensemble.state_dict(), tmp_path / "ensemble.pt")
    for network, member in ((0, 0), (1, 1), (2, 1)):
        fresh = build_network(spec)
        assert load_initial_weights(fresh, tmp_path / "ensemble.pt", network).message.endswith(f"(its member {member + 1})")
        assert torch.equal(fresh.conv1.weight, ensemble.members[member].conv1.weight)
    whole = one_network([build_network(spec), build_network(spec)])
    assert "(its member" not in load_initial_weights(whole, tmp_path / "ensemble.pt").message, "an ensemble starts as a whole"
    assert torch.equal(whole.members[1].conv1.weight, donor.conv1.weight)
    torch.save({"members.head.w": torch.zeros(1), **donor.state_dict()}, tmp_path / "odd_names.pt")
    assert "(its member" not in load_initial_weights(build_network(spec), tmp_path / "odd_names.pt").message
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a PyTorch checkpoint"):
        load_initial_weights(three_classes, tmp_path / "junk.pt")


def test_loaded_parameters_learn_at_their_own_rate():
    from components.model import ModelSpec, build_network
    from components.train import rate_groups

    net = build_network(ModelSpec(network="resnet", image_size=32, channels=[8, 8, 16, 16], blocks=[1, 1, 1, 1], classes=["a", "b"]))
    loaded = frozenset(name for name, _ in net.named_parameters() if not name.startswith("fc."))
    fresh, slower = rate_groups(net.named_parameters(), 3e-3, loaded, 0.1)
    assert (fresh["lr"], slower["lr"]) == (3e-3, pytest.approx(3e-4))
    assert {id(p) for p in fresh["params"]} == {id(net.fc.weight), id(net.fc.bias)}
    assert len(slower["params"]) == len(loaded)
    assert [g["lr"] for g in rate_groups(net.named_parameters(), 3e-3, frozenset(), 0.1)] == [3e-3], "nothing loaded: one group"
    assert [g["lr"] for g in rate_groups(net.named_parameters(), 3e-3, loaded, 1.0)] == [3e-3], "factor 1: one group"


def _one_cycle_rates(time_shares: list[float], budgeted: bool = True) -> list[float]:
    import torch

    from components.train import budgeted_one_cycle

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    schedule = budgeted_one_cycle(optimizer, [1e-2], 10) if budgeted else torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, 10)
    rates = []
    for share in time_shares:
        schedule.time_share = share
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    return rates


def test_the_one_cycle_schedule_goes_by_the_time_budget_when_time_runs_out_first():
    torch_one_cycle = _one_cycle_rates([0.0] * 9, budgeted=False)
    assert _one_cycle_rates([0.0] * 9) == torch_one_cycle, "no time spent: torch's schedule exactly"
    assert _one_cycle_rates([0.0] * 4 + [1.0] * 5)[4:] == pytest.approx([1e-2 / 25 / 1e4] * 5), "budget spent: annealed"
    halfway = _one_cycle_rates([0.5] * 9)
    assert halfway[:4] == pytest.approx([torch_one_cycle[3] + (torch_one_cycle[4] - torch_one_cycle[3]) / 2] * 4, rel=0.05)
    assert halfway[4:] == torch_one_cycle[4:], "the steps further along than the time: the steps lead"


def _stops_by_epoch(config: TrainConfig, val_losses: list[float | tuple[str, float]]) -> list[bool]:
    """Whether the stage's early stopping tells the Trainer to stop after each epoch of these validation losses
    (logged as val_loss, or under the name given with one)."""
    from types import SimpleNamespace

    import torch

    from components.train import early_stopping

    callback = early_stopping(config)
    stops = []
    for epoch, logged in enumerate(val_losses):
        name, loss = logged if isinstance(logged, tuple) else ("val_loss", logged)
        trainer = SimpleNamespace(
            callback_metrics={name: torch.tensor(loss)}, fast_dev_run=False, should_stop=False, current_epoch=epoch,
            strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        )  # fmt: skip
        callback._run_early_stopping_check(trainer)
        stops.append(trainer.should_stop)
    return stops


def test_early_stopping_waits_for_half_the_epochs_but_not_for_a_diverged_loss():
    config = TrainConfig(epochs=8, patience=1)
    flat = [1.0] * 8
    assert _stops_by_epoch(config, flat) == [False, False, False, True, True, True, True, True], (
        "patience spent after epoch 2, held to epoch 4"
    )
    assert _stops_by_epoch(config.model_copy(update={"patience": 5}), flat) == [False] * 5 + [True] * 3, "after half: patience alone"
    assert _stops_by_epoch(config, [1.0, float("nan")])[1], "a non-finite loss stops at once"
    assert not any(_stops_by_epoch(config, [1.0, 1.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])), "a lull before half, then progress: no stop"
    smaller = [("val_loss_32px", 0.1)] * 4  # progressive resizing's early epochs: not compared, so no patience is spent
    assert _stops_by_epoch(config, [*smaller, 1.0, 1.0, 1.0, 1.0]) == [False] * 5 + [True] * 3
    assert _stops_by_epoch(config, [("val_loss_32px", 1.0), ("val_loss_32px", float("nan"))])[1], "diverged early: stops at once"
    with pytest.raises(RuntimeError, match="val_loss"):
        _stops_by_epoch(config, [("train_loss", 1.0)])  # an epoch that logged no validation loss at all is an error


def test_the_stages_checkpoint_is_written_after_every_epoch_and_keeps_the_best_full_size_one(tmp_path):
    """Lightning 2.6 writes last.ckpt only with a new best: a killed run would resume from its best epoch."""
    import lightning as L
    import torch

    from components.train import best_epoch_checkpoint

    logged = [("val_loss_16px", 0.1), ("val_loss", 0.5), ("val_loss", 0.6), ("val_loss", 0.7)]  # worse after epoch 2

    class Scripted(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, _):
            self.log(*logged[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)
    checkpoint = best_epoch_checkpoint(tmp_path)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    L.Trainer(max_epochs=4, callbacks=[checkpoint], **quiet).fit(Scripted(), data, data)
    epoch_of = lambda path: torch.load(path, map_location="cpu", weights_only=False)["epoch"]  # noqa: E731
    assert epoch_of(checkpoint.best_model_path) == 1, "the best of the full-size epochs, not the smaller-size one"
    assert epoch_of(tmp_path / "last.ckpt") == 3, "where training stopped"
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][checkpoint.state_key]["best_model_path"]


def test_early_stopping_resumes_the_state_lightnings_own_saved():
    from lightning.pytorch.callbacks import EarlyStopping

    from components.train import early_stopping

    assert early_stopping(TrainConfig()).state_key == EarlyStopping(monitor="val_loss").state_key


def test_the_stages_trainer_stops_early_with_the_held_back_rule_and_a_folds_does_not(tmp_path):
    from components.train import _trainer

    config = TrainConfig(epochs=8, patience=1, max_minutes=5)
    stage = _trainer(config, logger=False, checkpoints=tmp_path)
    assert hasattr(stage.early_stopping_callback, "too_early"), "the stage stops early by early_stopping(), not Lightning's plain rule"
    assert stage.early_stopping_callback.patience == 1
    assert stage.fit_loop.min_epochs is None, "no epoch floor holds back the time cap"
    assert _trainer(config, logger=False, checkpoints=None).early_stopping_callback is None, "a fold trains its epochs"


def _killed_then_rerun(tmp_path: Path, train: dict, kill_at: str) -> tuple[Path, str]:
    """A workspace trained until a line starting with ``kill_at`` (a checkpoint is on disk then, and the kill comes
    at once, with epochs left to train whatever the machine's speed), then trained again: the workspace and the
    second run's output (stdout, then stderr)."""
    import signal
    import subprocess
    import sys

    from tests.conftest import make_workspace, workspace_env

    root = make_workspace(tmp_path / "ws", {"synth": {"subjects": 16, "image_size": 64}, "train": train})
    env = workspace_env(root)
    for name in ("synth", "ingest", "validate", "split"):
        assert subprocess.run([sys.executable, "-m", f"components.{name}"], cwd=root, env=env, capture_output=True).returncode == 0
    first = subprocess.Popen(
        [sys.executable, "-m", "components.train"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in first.stdout:
        if line.startswith(kill_at):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert list((root / "data" / "checkpoints").rglob("last.ckpt")), "the killed run left its checkpoint"
    statuses = [run.info.status for run in training_runs(root)[1]]
    assert statuses == ["RUNNING"], "a killed job's run is not marked finished by a network that was"
    second = subprocess.run([sys.executable, "-m", "components.train"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    return root, second.stdout + second.stderr


def _the_one_finished_run(root: Path):
    """The MLflow client and the id of the workspace's only training run, checked finished and cleaned up after."""
    client, runs = training_runs(root)
    assert [run.info.status for run in runs] == ["FINISHED"], "one job, one MLflow run"
    assert not list((root / "data" / "checkpoints").iterdir()), "a finished run leaves nothing to resume"
    return client, runs[0].info.run_id


def test_a_networks_end_leaves_the_jobs_run_running_and_a_failure_marks_it_failed(settings_env, tmp_path):
    import mlflow

    from components.train import _network_logger

    settings_env.setenv("TUMORSCOPE_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("job")).info.run_id
    logger = _network_logger(run_id, prefix="member1")
    logger.log_metrics({"val_loss": 0.5}, step=0)
    for status, expected in (("success", "RUNNING"), ("finished", "RUNNING"), ("failed", "FAILED")):
        logger.finalize(status)
        assert client.get_run(run_id).info.status == expected, status
    assert "member1-val_loss" in client.get_run(run_id).data.metrics


@pytest.mark.slow
def test_a_job_that_fails_after_its_run_started_is_marked_failed_not_finished(tmp_path):
    import subprocess
    import sys

    from tests.conftest import make_workspace, workspace_env

    train = {"image_size": 32, "epochs": 1, "channels": [8, 8, 8, 8], "init_weights": str(tmp_path / "junk.pt")}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    root = make_workspace(tmp_path / "ws", {"synth": {"subjects": 16, "image_size": 64}, "train": train})
    env = workspace_env(root)
    for name in ("synth", "ingest", "validate", "split", "train"):
        stage = subprocess.run([sys.executable, "-m", f"components.{name}"], cwd=root, env=env, capture_output=True, text=True)
    assert stage.returncode == 2 and "not a PyTorch checkpoint" in stage.stdout + stage.stderr
    assert "Traceback" not in stage.stdout + stage.stderr
    assert [run.info.status for run in training_runs(root)[1]] == ["FAILED"]


def test_only_a_resumable_interrupted_job_reads_back_what_it_left(tmp_path, capsys):
    import torch

    from components.train import FINISHED, left_by_interruption

    first, second, third = (tmp_path / f"member{k}" for k in (1, 2, 3))
    for folder in (first, second, third):
        folder.mkdir()
    torch.save({"net": {}, "epochs": 7}, first / FINISHED)
    (second / FINISHED).write_bytes(b"torn")
    torch.save({"epoch": 2}, second / "last.ckpt")
    run_file = tmp_path / "mlflow_run_id"
    folders = [first, second, third]
    assert left_by_interruption(TrainConfig(), folders, run_file) == ([None] * 3, [None] * 3), "no run was interrupted"
    run_file.write_text("run-1")
    finished, resume_from = left_by_interruption(TrainConfig(), folders, run_file)
    assert [done and done["epochs"] for done in finished] == [7, None, None]
    assert resume_from == [None, second / "last.ckpt", None], "a torn finished network resumes from its checkpoint"
    assert "unreadable; that network trains again" in capsys.readouterr().out
    assert left_by_interruption(TrainConfig(resume=False), folders, run_file) == ([None] * 3, [None] * 3)


@pytest.mark.slow
def test_a_killed_training_run_resumes_where_it_stopped_as_the_same_mlflow_run(tmp_path):
    train = {"image_size": 32, "epochs": 6, "batch_size": 8, "channels": [8, 8, 8, 8], "patience": 10, "ema_decay": 0.9}
    root, output = _killed_then_rerun(tmp_path, train, kill_at="epoch 3/6")  # the moving average resumes too
    resumed_after = re.search(r"resuming the interrupted run from its checkpoint after epoch (\d)", output)
    assert resumed_after and int(resumed_after[1]) >= 2, "from the last epoch finished (2, or 3 if its checkpoint beat the kill)"
    assert "epoch 1/6" not in output and "epoch 6/6" in output
    assert not any(chatter in output for chatter in ("GPU available", "Tip:", "exists and is not empty")), "Lightning's chatter"
    _the_one_finished_run(root)


@pytest.mark.slow
def test_an_ensemble_killed_in_its_second_network_keeps_the_first_and_is_one_run_and_one_model(tmp_path):
    from components.model import Classifier

    train = {"image_size": 32, "epochs": 3, "batch_size": 8, "channels": [8, 8, 8, 8], "patience": 10, "members": 2}
    root, output = _killed_then_rerun(tmp_path, train, kill_at="member 2/2: epoch 2/3")
    assert "member 1/2: finished before the interruption" in output and "member 1/2: epoch" not in output
    assert "resuming the interrupted run" in output and "member 2/2: epoch 3/3" in output
    client, run_id = _the_one_finished_run(root)
    for member in ("member1", "member2"):
        history = client.get_metric_history(run_id, f"{member}-val_loss")
        assert len({entry.step for entry in history}) == 3  # by step: a kill between an epoch's log and its checkpoint logs it twice
    assert Classifier.load(root / "models").spec.members == 2


@pytest.mark.slow
def test_tuning_runs_a_grouped_cv_study_with_child_runs_and_applies_the_best_values(tmp_path):
    import subprocess
    import sys

    import optuna
    import yaml

    from tests.conftest import make_workspace, workspace_env

    params = {"synth": {"subjects": 30, "image_size": 64}, "train": {"image_size": 32, "channels": [8, 8, 8, 8]},
              "tune": {"trials": 2, "folds": 2, "epochs": 1}}  # fmt: skip
    root = make_workspace(tmp_path / "ws", params)
    env = workspace_env(root)
    for name in ("synth", "ingest", "validate", "split"):
        assert subprocess.run([sys.executable, "-m", f"components.{name}"], cwd=root, env=env, capture_output=True).returncode == 0
    tuned = subprocess.run(
        [sys.executable, "-m", "components.tune", "--apply"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert tuned.returncode == 0, tuned.stdout[-2000:] + tuned.stderr[-2000:]
    study = optuna.load_study(study_name="tumorscope-train", storage=f"sqlite:///{root / 'data' / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.value is not None for t in study.trials)
    written = yaml.safe_load((root / "params.yaml").read_text())["train"]
    assert written["learning_rate"] == study.best_params["learning_rate"] and written["batch_size"] == study.best_params["batch_size"]
    _, runs = training_runs(root, "tumorscope-tune")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2 and all("cv_roc_auc" in r.data.metrics for r in children)
    command = [sys.executable, "-m", "components.cli", "tune", "--trials", "1", "--workdir", str(root)]  # the CLI runs the tuning flow
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(optuna.load_study(study_name="tumorscope-train", storage=f"sqlite:///{root / 'data' / 'optuna.db'}").trials) == 3


def test_applying_tuned_values_keeps_the_params_files_comments(tmp_path):
    import shutil

    import yaml

    from components.tune import apply_to_params
    from tests.conftest import PROJECT

    params = tmp_path / "params.yaml"
    shutil.copy(PROJECT / "params.yaml", params)
    comments = [line for line in params.read_text().splitlines() if "#" in line]
    apply_to_params({"learning_rate": 0.0042, "batch_size": 64}, params)
    assert yaml.safe_load(params.read_text())["train"]["learning_rate"] == 0.0042
    kept = params.read_text()
    assert sum(comment.split("#", 1)[1].strip() in kept for comment in comments) >= len(comments) - 2


def _toy_split(folder: Path, n: int = 96, masks: bool = False) -> pd.DataFrame:
    """Colour slices; a tumour is a bright blob in the second sequence only (a FLAIR-like lesion), with its mask."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for index in range(n):
        image = (rng.random((48, 48, 3)) * 60).astype(np.uint8) + 40
        mask = np.zeros((48, 48), np.uint8)
        tumour = index % 2 == 0
        if tumour:
            r, c = rng.integers(10, 38, 2)
            image[r - 5 : r + 5, c - 5 : c + 5, 1] = 250
            mask[r - 5 : r + 5, c - 5 : c + 5] = 255
        path = folder / f"{index}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(mask).save(folder / f"{index}_mask.png")
        split = "test" if index % 5 == 4 else "val" if index % 5 == 3 else "train"  # both classes in each
        row = {"image_id": f"im{index}", "path": str(path), "label": "tumor" if tumour else "notumor", "split": split}
        rows.append(row | ({"mask_path": str(folder / f"{index}_mask.png")} if masks else {}))
    return pd.DataFrame(rows)


def test_fit_classifier_with_mixup_bf16_and_flip_averaging_learns_a_lesion_in_one_sequence(tmp_path, monkeypatch):
    from sklearn.metrics import roc_auc_score

    from components.imaging import read_slice
    from components.model import tumour_probability
    from components.train import fit_classifier

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(
        image_size=32, in_channels=3, channels=[8, 16, 16, 32], epochs=12, batch_size=16, mixup=0.4,
        precision="bf16-mixed", threads=1,
    )  # fmt: skip
    calibration = CalibrateConfig(target_sensitivity=0.9, flip_averaging=True)
    classifier, _ = fit_classifier(config, split[split["split"] != "test"], calibration)
    assert classifier.spec.in_channels == 3 and classifier.spec.flip_averaging
    assert 0 < classifier.spec.operating_threshold < 1 and classifier.spec.temperature != 1.0
    test = split[split["split"] == "test"]
    scores = tumour_probability(classifier.predict_proba([read_slice(p, color=True) for p in test["path"]]), classifier.spec)
    assert roc_auc_score(test["label"] == "tumor", scores) >= 0.9


def test_a_time_cap_that_stops_training_before_its_last_epoch_is_reported(tmp_path, monkeypatch, capsys):
    from components.train import fit_classifier

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(image_size=32, channels=[8, 8, 8, 8], epochs=4, members=2, max_minutes=2e-6, threads=1)
    fit_classifier(config, split[split["split"] != "test"])
    output = capsys.readouterr().out
    for member in (1, 2):  # a hard limit: the first step outlasts the cap
        assert f"member {member}/2: max_minutes (this network's share of it) stopped training at step 1 of 4 (epoch 1 of 4)" in output
    fit_classifier(config.model_copy(update={"max_minutes": 30, "epochs": 1, "members": 1}), split[split["split"] != "test"])
    assert "stopped training" not in capsys.readouterr().out


def test_a_time_cap_anneals_the_learning_rate_before_it_stops_training(tmp_path, monkeypatch):
    from components.train import _fit_network, _prepared

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(image_size=32, channels=[8, 8, 8, 8], epochs=6, max_minutes=1e-6, threads=1)
    config, spec, weights, rows = _prepared(config, split[split["split"] != "test"])
    _, trainer = _fit_network(config, spec.member, rows, weights, (0, 1))
    assert trainer.global_step == 1, "the cap is a hard limit: training stops after the step that outlasts it"
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx([config.learning_rate / 25 / 1e4])


def test_progressive_resizing_trains_and_validates_small_for_its_share_and_keeps_a_full_size_epoch(tmp_path, monkeypatch, capsys):
    import torch
    from pydantic import ValidationError

    from components.model import build_network
    from components.train import _fit_network, _prepared

    seen: list[tuple[bool, int]] = []  # (training, input size) of every forward pass of the network

    def recorded_network(spec):
        net = build_network(spec)
        net.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
        return net

    monkeypatch.setattr("components.train.build_network", recorded_network)
    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(image_size=48, early_image_size=32, early_share=0.5, channels=[8, 8, 8, 8], epochs=4, threads=1)
    config, spec, weights, rows = _prepared(config, split[split["split"] != "test"])
    _, trainer = _fit_network(config, spec.member, rows, weights, (0, 1), checkpoints=tmp_path / "checkpoints")
    trained_at = [size for training, size in seen if training]
    assert trainer.global_step == 4 and trained_at == [32, 32, 48, 48]
    assert {size for training, size in seen if not training} == {32, 48}
    output = capsys.readouterr().out
    assert "training batches at 32 px from step 1\n" in output and "training batches at 48 px from step 3\n" in output
    epoch_lines = [line for line in output.splitlines() if line.startswith("epoch ")]  # each validated at its training size
    assert [("val_loss_32px " in line, "val_loss " in line) for line in epoch_lines] == [(True, False)] * 2 + [(False, True)] * 2
    # the epoch kept is picked on val_loss alone, which only full-size epochs log (a plain ModelCheckpoint refuses that)
    kept = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    assert kept["epoch"] >= 2 and trainer.checkpoint_callback.state_key.startswith("ModelCheckpoint{")
    with pytest.raises(ValidationError, match="early_image_size"):
        TrainConfig(image_size=48, early_image_size=48)


def test_progressive_resizing_keys_the_checkpoint_folder_only_when_it_is_on():
    from components.train import checkpoint_folder

    plain = checkpoint_folder(TrainConfig(), "data")
    assert checkpoint_folder(TrainConfig(early_share=0.3), "data") == plain, "an unused share must not strand a resumable run"
    assert checkpoint_folder(TrainConfig(early_image_size=64), "data") != plain
    assert checkpoint_folder(TrainConfig(early_image_size=64, early_share=0.3), "data") != checkpoint_folder(
        TrainConfig(early_image_size=64), "data"
    )


def test_cross_validation_and_tuning_folds_start_from_the_initial_weights_too(tmp_path, monkeypatch, capsys):
    import torch

    from components.model import build_network
    from components.train import fit_classifier, model_spec

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(image_size=32, channels=[8, 8, 8, 8], epochs=1, members=2, threads=1)
    torch.save(build_network(model_spec(config, ["notumor", "tumor"]).member).state_dict(), tmp_path / "pretrained.pt")
    fit_classifier(config.model_copy(update={"init_weights": tmp_path / "pretrained.pt"}), split[split["split"] != "test"])
    output = capsys.readouterr().out
    for member in (1, 2):
        assert f"member {member}/2: initial weights: " in output
    assert output.count("tensors from pretrained.pt") == 2


def test_tensors_from_starting_weights_learn_at_the_factor_of_the_rate(tmp_path, monkeypatch, capsys):
    import torch

    from components.model import build_network
    from components.train import _fit_network, _prepared, model_spec

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)
    config = TrainConfig(image_size=32, channels=[8, 8, 8, 8], epochs=1, threads=1, pretrained_lr_factor=0.1)
    donor = build_network(model_spec(config, ["a", "b", "c"]).member)  # another set's classes: a fresh last layer
    torch.save(donor.state_dict(), tmp_path / "pretrained.pt")
    config, spec, weights, split = _prepared(config.model_copy(update={"init_weights": tmp_path / "pretrained.pt"}), split)
    module, trainer = _fit_network(config, spec, split, weights, (0, 1))
    fresh, loaded = trainer.optimizers[0].param_groups
    assert (fresh["max_lr"], loaded["max_lr"]) == (config.learning_rate, pytest.approx(config.learning_rate * 0.1))
    assert {id(p) for p in fresh["params"]} == {id(module.net.fc.weight), id(module.net.fc.bias)}
    assert len(loaded["params"]) == len(list(module.net.parameters())) - 2
    _fit_network(config.model_copy(update={"init_weights": None}), spec, split, weights, (0, 1))
    assert "pretrained_lr_factor 0.1 has no effect: no starting weights" in capsys.readouterr().out


def test_a_lesion_map_learnt_from_masks_finds_the_lesion(tmp_path, monkeypatch):
    import torch
    from sklearn.metrics import roc_auc_score

    from components.calibrate import choose_operating_threshold
    from components.dataset import prepared_images, prepared_masks
    from components.model import tumour_probability
    from components.train import fit_classifier

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path, masks=True)
    config = TrainConfig(
        image_size=32, in_channels=3, channels=[8, 16, 16, 32], epochs=20, batch_size=8, mixup=0.2, mask_weight=1.0, threads=1,
    )  # fmt: skip
    calibration = CalibrateConfig(target_sensitivity=0.9, lesion_vote=True)
    classifier, fitted = fit_classifier(config, split[split["split"] != "test"], calibration)
    assert classifier.spec.lesion_head and classifier.spec.lesion_vote
    validation = split[split["split"] == "val"]
    served = tumour_probability(classifier.predict_prepared(prepared_images(validation, 32, channels=3))[0], classifier.spec)
    is_tumour = (validation["label"] == "tumor").to_numpy()
    point = choose_operating_threshold(served, is_tumour, calibration)
    assert point == {name: fitted[name] for name in point}, "chosen on the scores the endpoint computes (vote and temperature included)"
    test = split[(split["split"] == "test") & (split["label"] == "tumor")]
    images = prepared_images(split[split["split"] == "test"], 32, channels=3)
    scores = tumour_probability(classifier.predict_prepared(images)[0], classifier.spec)
    assert roc_auc_score(split.loc[split["split"] == "test", "label"] == "tumor", scores) >= 0.9
    with torch.no_grad():
        lesion_map = classifier.net.classify(torch.from_numpy(prepared_images(test, 32, channels=3)))[1][:, 0]
    masks = torch.nn.functional.interpolate(torch.from_numpy(prepared_masks(test, 32)[0]).float(), size=lesion_map.shape[-2:], mode="area")[
        :, 0
    ]
    probability = torch.sigmoid(lesion_map)
    contrast = [float(p[mask > 0.25].mean() / p[mask == 0].mean()) for p, mask in zip(probability, masks)]
    assert np.median(contrast) >= 2, f"the map is brighter on the lesion than off it: {np.round(contrast, 2)}"


def test_a_data_set_without_masks_trains_without_the_lesion_map(tmp_path, monkeypatch, capsys):
    from components.train import where_masks_exist

    split = _toy_split(tmp_path, n=20)
    config = TrainConfig(mask_weight=1.0)
    assert where_masks_exist(config, split).mask_weight == 0.0
    assert "no train slice has a lesion mask" in capsys.readouterr().out
    with_masks = _toy_split(tmp_path, n=20, masks=True)
    assert where_masks_exist(config, with_masks) is config
    with pytest.raises(ValueError, match="needs network 'resnet'"):
        TrainConfig(network="densenet121", mask_weight=1.0)


def test_weight_averaging_ships_the_moving_average_and_it_still_learns(tmp_path, monkeypatch):
    import torch
    from sklearn.metrics import roc_auc_score

    from components.imaging import read_slice
    from components.model import tumour_probability
    from components.train import fit_classifier

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path)

    def fitted(decay: float) -> dict:
        config = TrainConfig(image_size=32, in_channels=3, channels=[8, 16, 16, 32], epochs=10, batch_size=16, ema_decay=decay, threads=1)
        return fit_classifier(config, split[split["split"] != "test"])[0]

    def changed(one, other) -> int:
        first, second = one.net.state_dict(), other.net.state_dict()
        return sum(not torch.equal(value, second[name]) for name, value in first.items())

    raw, raw_again, averaged = fitted(0.0), fitted(0.0), fitted(0.9)
    assert changed(raw, raw_again) == 0, "the same seed trains the same weights"
    assert changed(raw, averaged) > len(raw.net.state_dict()) // 2, "so only the average differs"
    test = split[split["split"] == "test"]
    scores = tumour_probability(averaged.predict_proba([read_slice(p, color=True) for p in test["path"]]), averaged.spec)
    assert roc_auc_score(test["label"] == "tumor", scores) >= 0.9


def test_the_moving_average_ramps_up_to_its_decay():
    import torch
    from torch.optim.swa_utils import AveragedModel

    from components.train import ramped_moving_average

    weight = torch.nn.Linear(1, 1, bias=False)
    average = AveragedModel(weight, multi_avg_fn=ramped_moving_average(0.9))
    for value in (0.0, 1.0):
        weight.weight.data.fill_(value)
        average.update_parameters(weight)
    assert average.module.weight.item() == pytest.approx(1 - 2 / 11), "the second update moves it 9/11 of the way"
    for _ in range(200):
        average.update_parameters(weight)
    weight.weight.data.fill_(0.0)
    average.update_parameters(weight)
    assert average.module.weight.item() == pytest.approx(0.9, abs=1e-6), "later the decay caps the rate"


def test_a_killed_run_resumes_only_with_the_same_params_data_and_starting_weights(tmp_path):
    from components.train import checkpoint_folder

    config = TrainConfig(checkpoint_root=tmp_path)
    assert checkpoint_folder(config.model_copy(update={"threads": 1}), "d1") == checkpoint_folder(config, "d1")
    start = tmp_path / "pretrained.pt"
    start.write_bytes(b"weights one")
    pretrained = config.model_copy(update={"init_weights": start})
    before = checkpoint_folder(pretrained, "d1")
    start.write_bytes(b"weights two")  # the pretrain stage rewrote its file in place
    assert checkpoint_folder(pretrained, "d1") != before
    assert checkpoint_folder(config.model_copy(update={"learning_rate": 0.01}), "d1") != checkpoint_folder(config, "d1")
    assert checkpoint_folder(config, "d2") != checkpoint_folder(config, "d1")
    assert checkpoint_folder(config.model_copy(update={"members": 2}), "d1") != checkpoint_folder(config, "d1")


def _pretraining_split(folder: Path, labels: list[str]) -> Path:
    """A pretraining set's split as the pretrain_set stage writes it: gray slices, its own class names."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for index, label in enumerate(labels):
        path = folder / f"{index}.png"
        Image.fromarray((rng.random((40, 40)) * 200).astype(np.uint8)).save(path)
        rows.append({"image_id": f"pre{index}", "label": label, "path": str(path), "split": "val" if index % 4 == 3 else "train"})
    pd.DataFrame(rows).to_csv(folder / "split.csv", index=False)
    return folder / "split.csv"


def test_cotraining_rows_take_the_pipelines_classes_and_say_when_they_cannot(tmp_path, capsys):
    from components.train import cotraining_rows

    split_file = _pretraining_split(tmp_path / "pre", ["glioma", "notumor", "pituitary", "notumor", "no_tumor"] * 3)
    config = TrainConfig(cotrain_share=0.5, cotrain_split=split_file)
    binary = cotraining_rows(config, ["notumor", "tumor"])
    assert len(binary) == 9 and set(binary["split"]) == {"cotrain"}, "train rows only, and not another spelling of no tumour"
    assert binary["label"].value_counts().to_dict() == {"tumor": 5, "notumor": 4}, "every tumour type is the one tumour class"
    assert (
        "co-training: each epoch also draws 0.5 × the train images from 9 pretraining images (notumor 4, tumor 5)"
        in capsys.readouterr().out
    )
    types = cotraining_rows(config, ["glioma", "meningioma", "notumor"])
    assert types["label"].value_counts().to_dict() == {"notumor": 4, "glioma": 3}, "a type the pipeline lacks is left out"
    assert cotraining_rows(config.model_copy(update={"cotrain_share": 0.0}), ["notumor", "tumor"]).empty
    assert cotraining_rows(config.model_copy(update={"cotrain_split": None}), ["notumor", "tumor"]).empty
    assert "train.cotrain_share 0.5 has no effect: no pretraining images fit" in capsys.readouterr().out


def test_an_epoch_holds_every_own_row_once_and_fresh_draws_of_the_extra_ones():
    import torch

    from components.dataset import MixedEpochs

    torch.manual_seed(0)
    sampler = MixedEpochs(own=10, extra=25, drawn=10)
    epochs = [list(sampler) for _ in range(5)]
    assert all(len(epoch) == len(sampler) == 20 for epoch in epochs)
    assert all(sorted(i for i in epoch if i < 10) == list(range(10)) for epoch in epochs)
    drawn = [i for epoch in epochs[:2] for i in epoch if i >= 10]
    assert len(set(drawn)) == 20 and min(drawn) >= 10 and max(drawn) < 35, "no repeat before all 25 were drawn"
    assert set(i for epoch in epochs for i in epoch if i >= 10) == set(range(10, 35))
    assert epochs[0] != sorted(epochs[0]), "shuffled together"
    assert len(MixedEpochs(own=10, extra=0, drawn=10)) == 10


def test_class_weights_balance_what_an_epoch_holds():
    from components.train import class_weights

    own = pd.Series(["notumor"] * 30 + ["tumor"] * 10)
    assert class_weights(own, ["notumor", "tumor"]) == pytest.approx([40 / 60, 40 / 20])
    drawn = pd.Series(["tumor"] * 3 + ["notumor"])  # drawn at 0.5 × 40: 15 tumour, 5 notumor in expectation
    assert class_weights(own, ["notumor", "tumor"], drawn, 0.5) == pytest.approx([60 / 70, 60 / 50])


def test_a_fit_draws_pretraining_slices_into_every_epoch_beside_masked_ones(tmp_path, monkeypatch, capsys):
    from components.train import _fit_network, _prepared

    monkeypatch.chdir(tmp_path)
    split = _toy_split(tmp_path, n=40, masks=True)
    split_file = _pretraining_split(tmp_path / "pre", ["meningioma", "notumor"] * 20)
    config = TrainConfig(
        image_size=32, in_channels=3, channels=[8, 8, 8, 8], epochs=2, batch_size=8, mask_weight=1.0, mixup=0.2,
        threads=1, cotrain_share=1.0, cotrain_split=split_file,
    )  # fmt: skip
    config, spec, weights, prepared = _prepared(config, split[split["split"] != "test"])
    assert (prepared["split"] == "cotrain").sum() == 30
    module, trainer = _fit_network(config, spec, prepared, weights, (0, 1))
    own = (split["split"] == "train").sum()
    loader = trainer.train_dataloader
    assert len(loader.sampler) == 2 * own, "each own train slice once and as many pretraining slices"
    assert loader.dataset[0][3] and not loader.dataset[own][3], "a pretraining slice's (blank) mask is marked absent"
    assert trainer.current_epoch == 2 and np.isfinite(float(trainer.callback_metrics["train_mask_loss"]))
    assert "co-training: each epoch also draws 1.0 × the train images from 30 pretraining images" in capsys.readouterr().out


def test_the_pretrain_stages_split_is_what_its_run_cotrains_on(tmp_path):
    from components.config import Params

    params = Params.model_validate(
        {"pretrain": {"source": str(tmp_path), "data_dir": str(tmp_path / "pre")}, "train": {"cotrain_share": 0.5}}
    )
    assert params.train_as_run.cotrain_split == tmp_path / "pre" / "split.csv"
    assert Params.model_validate({}).train_as_run.cotrain_split is None
    with pytest.raises(ValueError, match="train.cotrain_split is the pretrain_set stage's split"):
        Params.model_validate({"train": {"cotrain_share": 0.5, "cotrain_split": str(tmp_path / "mine.csv")}})
