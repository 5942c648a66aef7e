import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

CLI = [sys.executable, "-m", "components.cli"]


def test_help_lists_every_command_without_heavy_imports():
    probe = "import sys, components.cli; heavy = {'torch', 'monai', 'mlflow', 'prefect', 'evidently', 'great_expectations'}; print(sorted(heavy & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    help_text = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "stage", "synth", "ingest", "predict", "serve", "monitor", "retrain"):
        assert command in help_text


def test_bad_data_folder_is_one_clear_line(tmp_path: Path):
    result = subprocess.run([*CLI, "ingest", "--source", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "missing: not a folder" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_outside_a_workspace_says_so(tmp_path: Path):
    result = subprocess.run([*CLI, "run", "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "no dvc.yaml" in result.stderr


def test_unknown_stage_is_refused():
    result = subprocess.run([*CLI, "stage", "nope"], capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 2 and "unknown stage 'nope'" in result.stderr


def test_pointing_params_at_real_data_sets_source_name_and_the_real_data_duplicate_threshold(tmp_path, monkeypatch):
    import shutil

    import yaml

    from components.cli import REAL_DATA_DUPLICATE_CORRELATION, _data_source, _rewrite_params

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "my-site" / "Training").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    _rewrite_params([_data_source(Path("my-site/Training"), None)])
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["ingest"]["source"] == str((tmp_path / "my-site" / "Training").resolve())
    assert params["register"]["model_name"] == "tumorscope-my-site-training"
    assert params["ingest"]["duplicate_correlation"] == REAL_DATA_DUPLICATE_CORRELATION == 0.97
    assert "# TumorScope pipeline parameters" in (tmp_path / "params.yaml").read_text(), "comments are kept"


def test_pretrain_data_sets_the_pretraining_source_and_training_then_starts_from_its_weights(tmp_path, monkeypatch):
    import shutil

    from components.cli import _pretraining_source, _rewrite_params
    from components.config import load_params

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "other-set").mkdir()
    monkeypatch.chdir(tmp_path)
    _rewrite_params([_pretraining_source(Path("other-set"))])
    params = load_params()
    assert params.pretrain.source == (tmp_path / "other-set").resolve()
    assert params.train_as_run.init_weights == params.pretrain.out_dir / "model.pt"
    assert "# TumorScope pipeline parameters" in (tmp_path / "params.yaml").read_text(), "comments are kept"
    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    params_before = (tmp_path / "params.yaml").read_text()
    result = subprocess.run([*CLI, "run", "--pretrain-data", "missing"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "missing: not a folder" in result.stderr
    result = subprocess.run([*CLI, "run", "--pretrain-data", "other-set", "--no-pretrain"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "choose one" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == params_before


def test_a_refused_params_change_writes_nothing_and_no_pretrain_unsets_the_source(tmp_path, monkeypatch):
    import shutil

    from components.cli import _data_source, _preset, _pretraining_source, _rewrite_params
    from components.config import load_params
    from components.errors import TumorScopeError

    (tmp_path / "my-site").mkdir()
    (tmp_path / "other-set").mkdir()
    monkeypatch.chdir(tmp_path)
    with_own_weights = (
        (PROJECT / "params.yaml")
        .read_text()
        .replace("  seed: 42\n  experiment: tumorscope\n", "  seed: 42\n  experiment: tumorscope\n  init_weights: mine.pt\n")
    )
    (tmp_path / "params.yaml").write_text(with_own_weights)
    with pytest.raises(TumorScopeError, match="pretrain.source and train.init_weights both name where training starts"):
        _rewrite_params([_data_source(Path("my-site"), None), _pretraining_source(Path("other-set"))])
    assert (tmp_path / "params.yaml").read_text() == with_own_weights, "neither change is written"
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    _rewrite_params([_pretraining_source(Path("other-set"))])
    _rewrite_params([_pretraining_source(None)])
    assert load_params().pretrain.source is None and load_params().train_as_run.init_weights is None
    _rewrite_params([_pretraining_source(Path("other-set"))])
    (tmp_path / "own-weights.yaml").write_text("train:\n  init_weights: mine.pt\n")
    _rewrite_params([_pretraining_source(None), _preset(str(tmp_path / "own-weights.yaml"))])  # checked together, not one by one
    assert str(load_params().train_as_run.init_weights) == "mine.pt"
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(TumorScopeError, match="own-weights.yaml: .*pretrain.source and train.init_weights"):
        _rewrite_params([_pretraining_source(Path("other-set")), _preset(str(tmp_path / "own-weights.yaml"))])
    assert (tmp_path / "params.yaml").read_text() == before


def test_a_preset_merges_into_params_and_a_bad_one_is_one_clear_line(tmp_path, monkeypatch):
    import shutil

    import yaml

    from components.cli import _preset, _rewrite_params
    from components.config import PRESET_DIR, load_params

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    _rewrite_params([_preset("lgg")])
    preset = yaml.safe_load((PRESET_DIR / "lgg.yaml").read_text())["train"]
    params = load_params(tmp_path / "params.yaml")
    train, calibrate = params.train, params.calibrate
    assert train.in_channels == preset["in_channels"] == 3 and train.precision == preset["precision"]
    assert calibrate.specificity_floor == 0.9, "every section the preset names is merged"
    assert calibrate.target_sensitivity == 0.95, "keys the preset does not name keep their values"
    assert "# TumorScope pipeline parameters" in (tmp_path / "params.yaml").read_text(), "comments are kept"
    (tmp_path / "bad.yaml").write_text("trian:\n  epochs: 3\n")
    result = subprocess.run([*CLI, "run", "--preset", str(tmp_path / "bad.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "unknown params.yaml sections ['trian']" in result.stderr
    assert "Traceback" not in result.stderr
    before = (tmp_path / "params.yaml").read_text()
    (tmp_path / "old.yaml").write_text("train:\n  epochs: 3\n  target_sensitivity: 0.9\n")  # written before the calibrate stage
    result = subprocess.run([*CLI, "run", "--preset", str(tmp_path / "old.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "old.yaml: train.target_sensitivity = 0.9" in result.stderr and "moved to calibrate" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == before, "a refused preset changes nothing"
    result = subprocess.run([*CLI, "run", "--preset", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "no such preset (presets: lgg, masoud" in result.stderr


def test_a_run_with_a_bad_value_in_params_stops_before_any_stage(tmp_path):
    import shutil

    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text().replace("  val_fraction: 0.15\n", "  val_fraction: 0.7\n"))
    result = subprocess.run([*CLI, "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "split.val_fraction" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists(), "no stage ran"


def test_predict_refuses_an_output_it_cannot_write_before_predicting(tmp_path: Path):
    for out, problem in ((tmp_path / "missing" / "preds.csv", "No such file or directory"), (tmp_path, "Is a directory")):
        result = subprocess.run([*CLI, "predict", str(tmp_path), "--out", str(out)], capture_output=True, text=True, cwd=PROJECT)
        assert result.returncode == 2 and f"{out}: cannot write the predictions there ({problem})" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "predicting" not in result.stdout + result.stderr


def test_serve_on_a_port_in_use_is_one_clear_line(tmp_path: Path):
    import json
    import shutil
    import socket

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, tmp_path / name)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "package.json").write_text(json.dumps({"bento": "tumorscope:anything"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "serve", "--port", str(port), "-C", str(tmp_path)], capture_output=True, text=True, cwd=PROJECT, timeout=60
        )
    assert result.returncode == 2 and f"127.0.0.1:{port}: cannot serve there (Address already in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
