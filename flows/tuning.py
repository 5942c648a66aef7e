"""The tuning flow: the Optuna study as one Prefect task in its own process (training never runs inside
the Prefect process), then the training flow when the best values were applied to params.yaml.

    tumorscope tune --trials 8 --apply
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow, task
from prefect.states import Failed

from flows.training import stage_error, stream, training


@task(task_run_name="optuna-study")
def study(workdir: str, trials: int | None, apply: bool) -> dict:
    command = [sys.executable, "-m", "components.tune", *(["--trials", str(trials)] if trials else []), *(["--apply"] if apply else [])]
    code, lines = stream(command, workdir, "tune")
    if code != 0:
        if errors := stage_error(lines):
            return {"error": errors}
        raise RuntimeError("tuning crashed:\n" + "\n".join(lines[-15:]))
    return json.loads((Path(workdir) / "reports" / "tune" / "best.json").read_text())


@flow(name="tuning", log_prints=True)
def tuning(workdir: str = ".", trials: int | None = None, apply: bool = False, retrain: bool = True) -> dict:
    """Tune; with ``apply`` (and ``retrain``), retrain with the best values: the gate decides as always."""
    best = study(workdir, trials, apply)
    if "error" in best:
        return Failed(message=f"tuning: {best['error']}")
    if apply and retrain:
        best["training"] = training(workdir=workdir)
    return best
