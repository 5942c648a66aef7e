"""The monitoring flow: drift check on served predictions, retraining when it drifts.

The check runs as its own process (``python -m components.monitor``), like every
stage, and writes its decision with reasons; when the decision says retrain, the
training flow runs from the train stage on, and the gate decides whether the
new model replaces the champion.

    python -m flows.monitoring --serve    # with a Prefect server: hourly schedule
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.states import Failed

from components.stage import ERROR_MARK
from flows.training import stage_env, training

DEFAULT_CRON = "0 * * * *"


@task(task_run_name="drift-check")
def check_drift(workdir: str, prediction_log: str | None = None) -> dict:
    env = stage_env(Path(workdir))
    if prediction_log:
        env["TUMORSCOPE_PREDICTION_LOG"] = str(Path(prediction_log).resolve())
    process = subprocess.run([sys.executable, "-m", "components.monitor"], cwd=workdir, env=env, capture_output=True, text=True)
    print(process.stdout.strip())
    if process.returncode != 0:
        errors = [line.split(ERROR_MARK, 1)[1].strip() for line in process.stderr.splitlines() if ERROR_MARK in line]
        if not errors:
            raise RuntimeError(f"drift check crashed:\n{process.stderr[-2000:]}")
        return {"error": "\n".join(errors)}
    report_dir = Path(workdir) / "reports" / "monitoring"
    return json.loads((report_dir / "decision.json").read_text())


@flow(name="monitoring", log_prints=True)
def monitoring(workdir: str = ".", retrain: bool = True, prediction_log: str | None = None) -> dict:
    decision = check_drift(workdir, prediction_log)
    if "error" in decision:
        return Failed(message=f"monitoring: {decision['error']}")
    decision["retrained"] = False
    if decision["retrain"] and retrain:
        print("drift detected: starting the training flow (retraining)")
        state = training(workdir=workdir, force_from="train", return_state=True)
        if state.is_failed():
            return Failed(message=f"retraining failed: {state.message}")
        decision["training"] = state.result()
        decision["retrained"] = True
    return decision


if __name__ == "__main__":
    if "--serve" in sys.argv:
        monitoring.serve(name="scheduled", cron=DEFAULT_CRON, tags=["tumorscope"])
    else:
        print(json.dumps(monitoring(), indent=2, default=str))
