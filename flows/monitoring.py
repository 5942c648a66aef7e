"""The monitoring flow: drift check on served predictions, retraining when it drifts.

The check runs as its own process (``python -m components.monitor``), like every
stage, and writes its decision with reasons; when the decision says retrain, the
training flow runs (the feedback stage turns new clinician labels into a new data
version; training is forced even without them), the gate decides whether the new
model replaces the champion, and a running endpoint (``TUMORSCOPE_SERVICE_URL``)
reloads it. One retraining at a time: a Prefect global concurrency limit.

    python -m flows.monitoring --serve    # with a Prefect server: hourly schedule
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.states import Failed

from components.config import load_params
from components.monitor import COOLDOWN_OVERRIDE, record_retraining
from components.stage import ERROR_MARK
from flows.training import stage_env, training

DEFAULT_CRON = "0 * * * *"
RETRAINING_LIMIT = "tumorscope-retraining"


@task(task_run_name="drift-check")
def check_drift(workdir: str, prediction_log: str | None = None, cooldown_hours: float | None = None) -> dict:
    env = stage_env(Path(workdir))
    if prediction_log:
        env["TUMORSCOPE_PREDICTION_LOG"] = str(Path(prediction_log).resolve())
    if cooldown_hours is not None:
        env[COOLDOWN_OVERRIDE] = str(cooldown_hours)
    process = subprocess.run([sys.executable, "-m", "components.monitor"], cwd=workdir, env=env, capture_output=True, text=True)
    print(process.stdout.strip())
    if process.returncode != 0:
        errors = [line.split(ERROR_MARK, 1)[1].strip() for line in process.stderr.splitlines() if ERROR_MARK in line]
        if not errors:
            raise RuntimeError(f"drift check crashed:\n{process.stderr[-2000:]}")
        return {"error": "\n".join(errors)}
    report_dir = Path(workdir) / "reports" / "monitoring"
    return json.loads((report_dir / "decision.json").read_text())


def retraining_slot() -> None:
    """The Prefect global concurrency limit that queues retrainings one at a time (the training flow's workspace
    lock would refuse a second one outright; this makes it wait); created with one slot on first use."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(RETRAINING_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=RETRAINING_LIMIT, limit=1))


def history_dir(workdir: str) -> Path:
    """Where the drift check keeps its decision history (``monitor.report_dir``, relative to the workspace)."""
    root = Path(workdir)
    return root / load_params(root / "params.yaml").monitor.report_dir


@task(task_run_name="reload-service", retries=2, retry_delay_seconds=5)
def reload_service(service_url: str) -> dict:
    """Ask the running endpoint to serve the newest packaged model (no restart, no downtime)."""
    import httpx

    key = os.environ.get("TUMORSCOPE_SERVICE_API_KEY")  # a key with the 'admin' scope, where the endpoint has keys
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{service_url.rstrip('/')}/reload", json={}, headers=headers, timeout=120)
    response.raise_for_status()
    print(f"service at {service_url} now serves version {response.json()['model_version']}")
    return response.json()


@flow(name="monitoring", log_prints=True)
def monitoring(
    workdir: str = ".",
    retrain: bool = True,
    prediction_log: str | None = None,
    cooldown_hours: float | None = None,
    service_url: str | None = None,
) -> dict:
    """Check; when the decision says retrain: the training flow (new feedback labels become a new data version,
    the model is retrained, the gate decides), then the endpoint reloads if a new champion was packaged."""
    from prefect.concurrency.sync import concurrency

    decision = check_drift(workdir, prediction_log, cooldown_hours)
    if "error" in decision:
        return Failed(message=f"monitoring: {decision['error']}")
    decision["retrained"] = False
    if decision["retrain"] and retrain:
        print("retraining: " + "; ".join(decision["reasons"]))
        retraining_slot()
        with concurrency(RETRAINING_LIMIT, occupy=1, strict=True, timeout_seconds=3600):
            state = training(workdir=workdir, force_from="train", return_state=True)
        summary = None if state.is_failed() else state.result()
        record_retraining(history_dir(workdir), (summary or {}).get("gate"))
        if summary is None:
            return Failed(message=f"retraining failed: {state.message}")
        decision["training"] = summary
        decision["retrained"] = True
        service_url = service_url or os.environ.get("TUMORSCOPE_SERVICE_URL")
        if service_url and (decision["training"].get("gate") or {}).get("promoted"):
            decision["service"] = reload_service(service_url)
    return decision


if __name__ == "__main__":
    if "--serve" in sys.argv:
        monitoring.serve(name="scheduled", cron=DEFAULT_CRON, tags=["tumorscope"])
    else:
        print(json.dumps(monitoring(), indent=2, default=str))
