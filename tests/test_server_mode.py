"""Server mode with real services on 127.0.0.1: PostgreSQL behind the MLflow and Prefect servers, an S3 server
(moto) for MLflow's artifacts and the DVC remote, a Prefect worker that runs the training flow as a deployment,
and `bentoml serve` answering with the champion it loads from the MLflow server. Started and stopped by
infra/local/stack.py, the same script `make up` / `make down` run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROJECT, make_workspace, workspace_env
from tests.endpoint import free_port, serve_command
from tests.test_e2e import TINY

pytestmark = pytest.mark.slow
STACK = PROJECT / "infra" / "local" / "stack.py"
MODEL = "tumorscope-synth"


def _postgres_available() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


def _free_port_base(count: int = 4) -> int:
    """A port with the next ``count - 1`` free as well (the stack's ports are consecutive)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports found")


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


class Stack:
    def __init__(self, root: Path, state: Path) -> None:
        self.root, self.state = root, state
        self.env = {
            **workspace_env(root),
            "TUMORSCOPE_STACK_DIR": str(state),
            "TUMORSCOPE_STACK_PORT_BASE": str(_free_port_base()),
            "TUMORSCOPE_SCHEDULES": "paused",  # on demand only: an hourly run must not fire during the test
        }

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=600)

    @property
    def client(self) -> dict[str, str]:
        return {**self.env, **read_env_file(self.state / "client.env"), "PREFECT_HOME": str(self.state / "prefect-client")}

    @property
    def secrets(self) -> dict[str, str]:
        return read_env_file(self.state / "secrets.env")

    def python(self, code: str, timeout: int = 900) -> str:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=self.root, env=self.client, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not _postgres_available():
        pytest.skip("PostgreSQL server binaries not installed (Debian package 'postgresql'): server mode needs them")
    base = tmp_path_factory.mktemp("server-mode")
    stack = Stack(make_workspace(base / "ws", TINY), base / "stack")
    started = stack.run("up", "--workdir", str(stack.root))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield stack
    finally:
        stack.run("down", "--purge")


@pytest.fixture(scope="module")
def deployment_run(stack: Stack) -> dict:
    """The training flow, run as its deployment by the worker (not in this process)."""
    out = stack.python(
        "import json\n"
        "from prefect.deployments import run_deployment\n"
        "run = run_deployment('training/scheduled', timeout=900)\n"
        "print(json.dumps({'state': run.state.type.value, 'message': run.state.message, 'pool': run.work_pool_name,\n"
        "                  'worker': str(run.infrastructure_pid or ''), 'id': str(run.id)}))\n"
    )
    return json.loads(out.strip().splitlines()[-1])


def test_stack_runs_every_service_and_deploys_both_flows_with_schedules(stack: Stack):
    status = stack.run("status").stdout
    for service in ("postgres", "s3", "mlflow", "prefect", "worker"):
        assert f"{service:9s} running" in status
    flows = stack.python(
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    for d in client.read_deployments():\n"
        "        print(client.read_flow(d.flow_id).name, d.name, d.work_pool_name, d.schedules[0].schedule.cron)\n"
    )
    assert "training scheduled tumorscope 0 2 * * 0" in flows and "monitoring scheduled tumorscope 0 * * * *" in flows


def test_worker_runs_the_training_deployment_into_the_servers(stack: Stack, deployment_run: dict):
    import psycopg2

    assert deployment_run["state"] == "COMPLETED", deployment_run
    assert deployment_run["pool"] == "tumorscope"
    assert "Worker 'tumorscope-local' submitting flow run" in (stack.state / "logs" / "worker.log").read_text()
    assert not (stack.root / "mlflow.db").exists(), "nothing fell back to the embedded SQLite store"

    champion = json.loads(
        stack.python(
            "import json, mlflow\n"
            f"c = mlflow.MlflowClient(); v = c.get_model_version_by_alias('{MODEL}', 'champion')\n"
            "print(json.dumps({'version': v.version, 'artifacts': c.get_run(v.run_id).info.artifact_uri}))\n"
        ).splitlines()[-1]
    )
    assert champion["artifacts"].startswith("mlflow-artifacts:"), "artifacts go through the MLflow server's proxy"

    port = int(stack.env["TUMORSCOPE_STACK_PORT_BASE"])
    with psycopg2.connect(
        host="127.0.0.1", port=port, user="tumorscope", password=stack.secrets["POSTGRES_PASSWORD"], dbname="mlflow"
    ) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,))
            assert cursor.fetchone()[0] >= 1
    with psycopg2.connect(
        host="127.0.0.1", port=port, user="tumorscope", password=stack.secrets["POSTGRES_PASSWORD"], dbname="prefect"
    ) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT state_type FROM flow_run WHERE id = %s", (deployment_run["id"],))
            assert cursor.fetchone()[0] == "COMPLETED"

    counts = json.loads(
        stack.python(
            "import boto3, json\n"
            "s3 = boto3.client('s3')\n"
            "print(json.dumps({b: s3.list_objects_v2(Bucket=b).get('KeyCount', 0) for b in ('tumorscope-mlflow', 'tumorscope-dvc')}))\n"
        ).splitlines()[-1]
    )
    assert counts["tumorscope-mlflow"] > 0, "MLflow artifacts (the model) are in the object store"
    assert counts["tumorscope-dvc"] > 0, "the flow pushed its data versions to the DVC remote on the object store"


def test_bentoml_serve_answers_with_the_champion_from_the_mlflow_server(stack: Stack, deployment_run: dict, tmp_path: Path):
    port = free_port()
    env = {
        **stack.client,
        "TUMORSCOPE_SERVE_REGISTERED_MODEL": MODEL,
        "BENTOML_HOME": str(tmp_path / "bentoml"),  # an empty model store: the model can only come from MLflow
        "TUMORSCOPE_PREDICTION_LOG": str(tmp_path / "predictions.sqlite"),
    }
    server = subprocess.Popen(serve_command(port), cwd=stack.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        image = next((stack.root / "data" / "synth").glob("tumor/*.png"))
        answer = httpx.post(f"{url}/predict", files={"image": image.open("rb")}, timeout=60).json()
        assert answer["model_name"] == MODEL and answer["model_version"] == "1" and answer["label"] in ("tumor", "notumor")
        assert httpx.post(f"{url}/reload", json={}, timeout=60).json()["model_version"] == "1"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_no_secret_reaches_a_log_the_workspace_or_mlflow(stack: Stack, deployment_run: dict):
    import importlib.util

    secrets = [stack.secrets[name].encode() for name in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY")]
    spec = importlib.util.spec_from_file_location("stack", STACK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    postgres_log = module.postgres_data_dir(stack.state) / "postgres.log"
    assert postgres_log.exists()
    files = [postgres_log, *(stack.state / "logs").rglob("*"), *stack.root.rglob("*")]
    leaks = [str(path) for path in files if path.is_file() and any(secret in path.read_bytes() for secret in secrets)]
    recorded = stack.python(
        "import json, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "runs = c.search_runs([e.experiment_id for e in c.search_experiments()])\n"
        "print(json.dumps([{**r.data.params, **r.data.tags} for r in runs]))\n"
    )
    leaks += [f"mlflow run data: {secret[:4]!r}…" for secret in secrets if secret.decode() in recorded]
    assert leaks == []
