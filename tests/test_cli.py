import subprocess
import sys
from pathlib import Path

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
