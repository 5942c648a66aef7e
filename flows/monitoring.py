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
from prefect.states import Failed, State

from components.config import load_params
from components.monitor import (
    COOLDOWN_OVERRIDE,
    DECISION_FILE,
    FAILED,
    GATE_REACHED,
    WORKSPACE_BUSY,
    record_retraining,
    retraining_since,
)
from components.stage import ERROR_MARK
from flows.training import BUSY, stage_env, training

DEFAULT_CRON = "0 * * * *"
RETRAINING_LIMIT = "tumorscope-retraining"


def monitoring_dir(workdir: str) -> Path:
    """Where the drift check writes its decision and history (``monitor.report_dir``, relative to the workspace)."""
    root = Path(workdir)
    return root / load_params(root / "params.yaml").monitor.report_dir


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
    return json.loads((monitoring_dir(workdir) / DECISION_FILE).read_text())


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
    decision = check_drift(workdir, prediction_log, cooldown_hours)
    if "error" in decision:
        return Failed(message=f"monitoring: {decision['error']}")
    decision["retrained"] = False
    if decision["retrain"] and retrain:
        print("retraining: " + "; ".join(decision["reasons"]))
        failed = retrain_for(decision, workdir)
        if failed:
            return failed
        service_url = service_url or os.environ.get("TUMORSCOPE_SERVICE_URL")
        if decision["retrained"] and service_url and (decision["training"].get("gate") or {}).get("promoted"):
            decision["service"] = reload_service(service_url)
    return decision


def retrain_for(decision: dict, workdir: str) -> State | None:
    """The training flow for one decision, one retraining at a time; its outcome goes into the decision history,
    which the cooldown reads. Sets ``decision['retrained']`` and ``['training']``; a failure comes back as a state."""
    from prefect.concurrency.sync import concurrency

    history = monitoring_dir(workdir)
    retraining_slot()
    with concurrency(RETRAINING_LIMIT, occupy=1, strict=True, timeout_seconds=3600):
        answered = retraining_since(history, decision["time"])
        if answered:  # this check waited for the slot behind a retraining that saw the same drift
            decision["reasons"].append(f"a retraining ended at {answered}, after this decision: not retraining again")
            return None
        state = training(workdir=workdir, force_from="train", return_state=True)
    if state.is_failed():
        busy = (state.message or "").startswith(BUSY)
        record_retraining(history, WORKSPACE_BUSY if busy else FAILED)
        return Failed(message=f"retraining failed: {state.message}")
    decision["training"] = state.result()
    decision["retrained"] = True
    record_retraining(history, GATE_REACHED, decision["training"].get("gate"))
    return None


if __name__ == "__main__":
    if "--serve" in sys.argv:
        monitoring.serve(name="scheduled", cron=DEFAULT_CRON, tags=["tumorscope"])
    else:
        print(json.dumps(monitoring(), indent=2, default=str))
