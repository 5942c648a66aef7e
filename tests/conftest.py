"""Shared fixtures: tiny deterministic data for unit tests, real data where it exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"

os.environ.setdefault("TUMORSCOPE_PSEUDONYM_KEY", "test-key-not-secret")
from components.settings import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)
TOOL_HOMES = ("PREFECT_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI", "TUMORSCOPE_PREDICTION_LOG", "PREFECT_API_URL")


# The pipeline's reports at test size: one classical model, few resamples and explanations. The end-to-end tests
# are about the path (stages, tools, registry, serving); tests/test_classical.py, test_evaluate.py and
# test_explain_report.py cover the reports themselves.
QUICK_REPORTS = {
    "classical": {"models": ["logistic_regression"], "bootstrap_resamples": 0},
    "evaluate": {"bootstrap_resamples": 100, "lesion_curve_slices": 20, "explain_tumours": 2},
}


def workspace_env(root: Path) -> dict[str, str]:
    """The environment a user has in ``root``: tool homes inside it, the venv on PATH."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in TOOL_HOMES}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TUMORSCOPE_PREDICTION_LOG"] = str(root / "data" / "predictions.sqlite")
    return env


def shared_data(relative: str) -> Path:
    """A real data set under ../shared/data, or a skip that says why."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (only on the development machine)")
    return path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """16 synthetic subjects × 2 slices at 64 px: both classes, masks, metadata."""
    from components.config import SynthConfig
    from components.synth import run

    out = tmp_path_factory.mktemp("cohort") / "synth"
    run(SynthConfig(out=out, subjects=16, slices_per_subject=2, image_size=64, seed=3))
    return out


def training_runs(root: Path, experiment: str = "tumorscope") -> tuple:
    """The workspace's MLflow client and the runs of one of its experiments (training's by default)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def bench_module(name: str):
    """A script of bench/ as a module (bench/ is no package): its arithmetic is tested like the code's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", PROJECT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_workspace(target: Path, params: dict | None = None) -> Path:
    """A copy of the project's tracked files as a fresh git + DVC workspace, with params overridden."""
    import yaml

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        source = PROJECT / name
        if source.is_file() and not name.startswith(("tests/", "bench/", "infra/")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    merged = yaml.safe_load((target / "params.yaml").read_text())
    for section, values in (params or {}).items():
        merged[section].update(values)
    (target / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target
